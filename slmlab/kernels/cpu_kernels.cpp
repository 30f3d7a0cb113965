// CPU kernels for decoding: bandwidth-bound matrix-vector products, and a fused decode step.
//
// 1. gemv / gemv_many: y = x W^T for a few rows of x, W stored (out, in) row-major.
// Decoding one token reads every weight once, so the product is bound by memory bandwidth,
// not arithmetic. The kernel streams each row of W once, keeps the running sums in registers
// (eight fp32 FMA lanes, four independent accumulators to hide the FMA latency) and splits the
// rows between threads. Built with AVX2/FMA where the compiler targets them; the scalar loop
// is the portable fallback and the tail of every row.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SLMLAB_AVX2 1
#endif

static inline float dot_row(const float* __restrict w, const float* __restrict x, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef SLMLAB_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  sum = _mm_cvtss_f32(s);
#endif
  for (; i < n; ++i) sum += w[i] * x[i];
  return sum;
}

// Waking a second thread costs microseconds, as much as reading a small matrix: split the rows
// only into blocks of at least `min_floats` weights (tunable: see set_min_floats_per_thread).
static int64_t min_floats = 1 << 16;
static inline int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, min_floats / std::max<int64_t>(k, 1)); }
void set_min_floats_per_thread(int64_t n) { min_floats = std::max<int64_t>(1, n); }

// x: (rows_x, in) with rows_x small (decode: 1); weight: (out, in); returns (rows_x, out).
torch::Tensor gemv(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32,
              "gemv: fp32 tensors expected");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "gemv: shapes ", x.sizes(), " and ", weight.sizes(), " do not multiply");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = grain_rows(k);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t b = 0; b < m; ++b) yp[b * n + r] = dot_row(wp + r * k, xp + b * k, k);
  });
  return y;
}

// Several products of the same x in one parallel region (q, k, v; or gate, up): one thread
// wake-up instead of three, which is most of what a small matrix costs.
std::vector<torch::Tensor> gemv_many(torch::Tensor x, std::vector<torch::Tensor> weights) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "gemv_many: fp32 (rows, in) x expected");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  std::vector<torch::Tensor> ys;
  std::vector<const float*> wps;
  std::vector<int64_t> offsets{0};
  for (auto& w : weights) {
    TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 2 && w.size(1) == k && w.is_contiguous(),
                "gemv_many: contiguous fp32 (out, ", k, ") weights expected, got ", w.sizes());
    ys.push_back(torch::empty({m, w.size(0)}, x.options()));
    wps.push_back(w.data_ptr<float>());
    offsets.push_back(offsets.back() + w.size(0));
  }
  const float* xp = x.data_ptr<float>();
  const int64_t grain = grain_rows(k);
  at::parallel_for(0, offsets.back(), grain, [&](int64_t begin, int64_t end) {
    size_t j = 0;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= offsets[j + 1]) ++j;
      const int64_t row = r - offsets[j], n = offsets[j + 1] - offsets[j];
      float* yp = ys[j].data_ptr<float>();
      for (int64_t b = 0; b < m; ++b) yp[b * n + row] = dot_row(wps[j] + row * k, xp + b * k, k);
    }
  });
  return ys;
}

// 2. decode_step: every block of a Llama-family decoder for one new token per row.
//
// The same computation as DecoderBlock.forward in slmlab/models/decoder.py, which is its
// reference in the tests, written as one call so that a token costs one trip from Python
// instead of dozens of small operator dispatches. Weights stay where PyTorch keeps them.
namespace {

void rms_norm(const float* x, const float* w, float* out, int64_t d, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < d; ++i) ss += double(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(float(ss / d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = w[i] * (x[i] * r);
}

// x (D) rotated in place: x*cos + roll(x, D/2)*signed_sin, as apply_rope in rope.py.
void rope(float* x, const float* cos, const float* sin, int64_t D, float* tmp) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < D; ++i) tmp[i] = x[i] * cos[i] + x[(i + h) % D] * sin[i];
  std::copy(tmp, tmp + D, x);
}

// y[m, n] = x[m, k] W[n, k]^T (+ bias), over the rows of several weights at once.
void project(const float* x, int64_t m, int64_t k, const std::vector<const float*>& w,
             const std::vector<int64_t>& rows, const std::vector<const float*>& bias,
             const std::vector<float*>& y) {
  std::vector<int64_t> offsets{0};
  for (auto r : rows) offsets.push_back(offsets.back() + r);
  at::parallel_for(0, offsets.back(), grain_rows(k), [&](int64_t begin, int64_t end) {
    size_t j = 0;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= offsets[j + 1]) ++j;
      const int64_t row = r - offsets[j], n = rows[j];
      for (int64_t b = 0; b < m; ++b) {
        float v = dot_row(w[j] + row * k, x + b * k, k);
        y[j][b * n + row] = bias[j] ? v + bias[j][row] : v;
      }
    }
  });
}

const float* opt(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

}  // namespace

// x: (B, d) embeddings of the new tokens; returns the residual stream after the last block.
// layers[i] = {input_norm, wq, wk, wv, bq, bk, bv, wo, post_norm, w_gate, w_up, w_down}
// (empty tensors where there is no bias); caches[i] = {keys, values}, each (B, K, max_len, D).
torch::Tensor decode_step(torch::Tensor x, std::vector<std::vector<torch::Tensor>> layers,
                          std::vector<std::vector<torch::Tensor>> caches, torch::Tensor key_mask,
                          torch::Tensor cos, torch::Tensor sin, int64_t length, double eps,
                          int64_t n_heads, int64_t n_kv_heads) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "decode_step: contiguous fp32 (B, d) input expected");
  TORCH_CHECK(key_mask.scalar_type() == torch::kBool && key_mask.is_contiguous(), "decode_step: bool key_mask");
  x = x.clone();
  const int64_t B = x.size(0), d = x.size(1);
  const int64_t D = cos.size(1), H = n_heads, K = n_kv_heads, group = H / K;
  const int64_t q_size = H * D, kv_size = K * D;
  const int64_t ff = layers[0][9].size(0), max_len = caches[0][0].size(2), S = length + 1;
  const float scale = 1.0f / std::sqrt(float(D));
  std::vector<float> h(B * d), q(B * q_size), k(B * kv_size), v(B * kv_size), o(B * q_size);
  std::vector<float> gate(B * ff), up(B * ff), out(B * d);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const bool* mask = key_mask.data_ptr<bool>();
  float* xp = x.data_ptr<float>();
  for (size_t li = 0; li < layers.size(); ++li) {
    auto& L = layers[li];
    for (auto& t : L) TORCH_CHECK(!t.numel() || (t.scalar_type() == torch::kFloat32 && t.is_contiguous()),
                                  "decode_step: contiguous fp32 weights expected");
    for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * d, L[0].data_ptr<float>(), h.data() + b * d, d, float(eps));
    project(h.data(), B, d, {L[1].data_ptr<float>(), L[2].data_ptr<float>(), L[3].data_ptr<float>()},
            {q_size, kv_size, kv_size}, {opt(L[4]), opt(L[5]), opt(L[6])}, {q.data(), k.data(), v.data()});
    float* kc = caches[li][0].data_ptr<float>();
    float* vc = caches[li][1].data_ptr<float>();
    std::vector<float> tmp(D);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hh = 0; hh < H; ++hh) rope(q.data() + b * q_size + hh * D, cp + b * D, sp + b * D, D, tmp.data());
      for (int64_t g = 0; g < K; ++g) {
        rope(k.data() + b * kv_size + g * D, cp + b * D, sp + b * D, D, tmp.data());
        const int64_t at = ((b * K + g) * max_len + length) * D;
        std::copy(k.data() + b * kv_size + g * D, k.data() + b * kv_size + (g + 1) * D, kc + at);
        std::copy(v.data() + b * kv_size + g * D, v.data() + b * kv_size + (g + 1) * D, vc + at);
      }
    }
    // Attention of each (row, head) to the S cached positions that are not padding.
    at::parallel_for(0, B * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(S * D, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> p(S);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, hh = bh % H, g = hh / group;
        const float* qv = q.data() + b * q_size + hh * D;
        const float* kb = kc + (b * K + g) * max_len * D;
        const float* vb = vc + (b * K + g) * max_len * D;
        float best = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          p[j] = mask[b * max_len + j] ? dot_row(kb + j * D, qv, D) * scale : -INFINITY;
          best = std::max(best, p[j]);
        }
        float total = 0.f;
        for (int64_t j = 0; j < S; ++j) total += (p[j] = p[j] == -INFINITY ? 0.f : std::exp(p[j] - best));
        float* ov = o.data() + b * q_size + hh * D;
        std::fill(ov, ov + D, 0.f);
        for (int64_t j = 0; j < S; ++j) {
          if (p[j] == 0.f) continue;
          const float w = p[j] / total;
          const float* vj = vb + j * D;
          for (int64_t i = 0; i < D; ++i) ov[i] += w * vj[i];
        }
      }
    });
    project(o.data(), B, q_size, {L[7].data_ptr<float>()}, {d}, {nullptr}, {out.data()});
    for (int64_t i = 0; i < B * d; ++i) xp[i] += out[i];
    for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * d, L[8].data_ptr<float>(), h.data() + b * d, d, float(eps));
    project(h.data(), B, d, {L[9].data_ptr<float>(), L[10].data_ptr<float>()}, {ff, ff}, {nullptr, nullptr},
            {gate.data(), up.data()});
    for (int64_t i = 0; i < B * ff; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    project(gate.data(), B, ff, {L[11].data_ptr<float>()}, {d}, {nullptr}, {out.data()});
    for (int64_t i = 0; i < B * d; ++i) xp[i] += out[i];
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x W^T for few rows of x");
  m.def("gemv_many", &gemv_many, "[x W_i^T for each W_i], in one parallel region");
  m.def("decode_step", &decode_step, "all decoder blocks for one new token per row");
  m.def("set_min_floats_per_thread", &set_min_floats_per_thread, "parallel grain, in weights");
}

// Batch-1 matrix-vector products for CPU decoding: y = x W^T with W stored (out, in) row-major.
//
// Decoding one token reads every weight once, so the product is bound by memory bandwidth,
// not arithmetic. The kernel streams each row of W once, keeps the running sums in registers
// (eight fp32 FMA lanes, four independent accumulators to hide the FMA latency) and splits the
// rows between threads. Built with AVX2/FMA where the compiler targets them; the scalar loop
// is the portable fallback and the tail of every row.
#include <torch/extension.h>
#include <ATen/Parallel.h>
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x W^T for few rows of x");
  m.def("gemv_many", &gemv_many, "[x W_i^T for each W_i], in one parallel region");
  m.def("set_min_floats_per_thread", &set_min_floats_per_thread, "parallel grain, in weights");
}

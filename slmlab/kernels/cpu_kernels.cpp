// CPU kernels for decoding: bandwidth-bound matrix-vector products, a weight-only int4 linear
// layer, a 2:4-sparse linear layer, and a fused decode step over layers of any of these kinds.
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
#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SLMLAB_AVX2 1
#endif

// Row w against M rows of x at once (x's rows k apart), into sums[0..M): each block of w is
// loaded once for all of them. Per row, the same four accumulators and the same order of
// additions as M = 1, so a row's result does not depend on how many rows came with it.
template <int M>
static inline void dot_rows(const float* __restrict w, const float* __restrict x, int64_t k, int64_t n,
                            float* sums) {
  int64_t i = 0;
  for (int b = 0; b < M; ++b) sums[b] = 0.f;
#ifdef SLMLAB_AVX2
  __m256 acc[M][4];
  for (int b = 0; b < M; ++b) acc[b][0] = acc[b][1] = acc[b][2] = acc[b][3] = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
    const __m256 w2 = _mm256_loadu_ps(w + i + 16), w3 = _mm256_loadu_ps(w + i + 24);
    for (int b = 0; b < M; ++b) {
      const float* xb = x + b * k + i;
      acc[b][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[b][0]);
      acc[b][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[b][1]);
      acc[b][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc[b][2]);
      acc[b][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc[b][3]);
    }
  }
  for (int b = 0; b < M; ++b) {
    const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[b][0], acc[b][1]), _mm256_add_ps(acc[b][2], acc[b][3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    sums[b] = _mm_cvtss_f32(s);
  }
#endif
  for (int b = 0; b < M; ++b)
    for (int64_t j = i; j < n; ++j) sums[b] += w[j] * x[b * k + j];
}

static inline float dot_row(const float* __restrict w, const float* __restrict x, int64_t n) {
  float sum;
  dot_rows<1>(w, x, n, n, &sum);
  return sum;
}

#if defined(SLMLAB_AVX2) && defined(__AVX512F__)
// Two rows of w against M rows of x. A few rows of x are bound by loads, not by memory: per
// 32 weights AVX2's loop loads w once and each row of x once, 8 floats at a time. Here a
// 16-float register holds two of AVX2's accumulators side by side (acc 0|1 and 2|3), and
// each block of x is loaded once for both rows of w: a third of the loads at 4 rows of x.
// Every lane does the FMAs AVX2's does, and the sums are added up in the same order, so the
// results are AVX2's to the bit (decoding must not depend on the build: tested).
static inline __m256 upper_half(__m512 a) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));  // AVX-512F alone
}

static inline float reduce_like_avx2(__m512 a01, __m512 a23) {
  const __m256 a = _mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(a01), upper_half(a01)),
                                 _mm256_add_ps(_mm512_castps512_ps256(a23), upper_half(a23)));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// Each row of w is asked for 4 KB ahead of its loads. At one row of x the hardware
// prefetcher keeps up alone; at four the loop's arithmetic delays the loads that would
// trigger it, and the fused step of stories-8m checking 4 tokens took 0.93 ms against 0.80
// with this (one token: 0.63 either way).
constexpr int64_t kPrefetchFloats = 1024;

template <int M>
static inline void dot_rows_pair(const float* __restrict w, const float* __restrict x, int64_t k, int64_t n,
                                 float* sums0, float* sums1) {
  __m512 acc[2][M][2];
  for (int r = 0; r < 2; ++r)
    for (int b = 0; b < M; ++b) acc[r][b][0] = acc[r][b][1] = _mm512_setzero_ps();
  const float* w1 = w + k;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i + kPrefetchFloats), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + i + kPrefetchFloats + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + i + kPrefetchFloats), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + i + kPrefetchFloats + 16), _MM_HINT_T0);
    const __m512 u0 = _mm512_loadu_ps(w + i), u1 = _mm512_loadu_ps(w + i + 16);
    const __m512 v0 = _mm512_loadu_ps(w1 + i), v1 = _mm512_loadu_ps(w1 + i + 16);
    for (int b = 0; b < M; ++b) {
      const __m512 x0 = _mm512_loadu_ps(x + b * k + i), x1 = _mm512_loadu_ps(x + b * k + i + 16);
      acc[0][b][0] = _mm512_fmadd_ps(u0, x0, acc[0][b][0]);
      acc[0][b][1] = _mm512_fmadd_ps(u1, x1, acc[0][b][1]);
      acc[1][b][0] = _mm512_fmadd_ps(v0, x0, acc[1][b][0]);
      acc[1][b][1] = _mm512_fmadd_ps(v1, x1, acc[1][b][1]);
    }
  }
  for (int b = 0; b < M; ++b) {
    sums0[b] = reduce_like_avx2(acc[0][b][0], acc[0][b][1]);
    sums1[b] = reduce_like_avx2(acc[1][b][0], acc[1][b][1]);
  }
  for (int b = 0; b < M; ++b)
    for (int64_t j = i; j < n; ++j) {
      sums0[b] += w[j] * x[b * k + j];
      sums1[b] += w1[j] * x[b * k + j];
    }
}
#define SLMLAB_DENSE_PAIRS 1
#endif

// y[b * n + row] = W[row] . x[b] for rows [begin, end) of W and the m rows of x, up to four
// rows of x at a time (and, with AVX-512, two rows of W).
static inline void dense_outputs(const float* w, int64_t k, int64_t begin, int64_t end, int64_t n, const float* x,
                                 int64_t m, const float* bias, float* y) {
  float sums[2][4];
  for (int64_t b0 = 0; b0 < m; b0 += 4) {
    const int64_t rows = std::min<int64_t>(4, m - b0);
    const float* xb = x + b0 * k;
    auto put = [&](int64_t row, const float* s) {
      for (int64_t b = 0; b < rows; ++b) y[(b0 + b) * n + row] = bias ? s[b] + bias[row] : s[b];
    };
    int64_t row = begin;
#ifdef SLMLAB_DENSE_PAIRS
    for (; row + 2 <= end; row += 2) {
      switch (rows) {
        case 1: dot_rows_pair<1>(w + row * k, xb, k, k, sums[0], sums[1]); break;
        case 2: dot_rows_pair<2>(w + row * k, xb, k, k, sums[0], sums[1]); break;
        case 3: dot_rows_pair<3>(w + row * k, xb, k, k, sums[0], sums[1]); break;
        default: dot_rows_pair<4>(w + row * k, xb, k, k, sums[0], sums[1]); break;
      }
      put(row, sums[0]);
      put(row + 1, sums[1]);
    }
#endif
    for (; row < end; ++row) {
      switch (rows) {
        case 1: dot_rows<1>(w + row * k, xb, k, k, sums[0]); break;
        case 2: dot_rows<2>(w + row * k, xb, k, k, sums[0]); break;
        case 3: dot_rows<3>(w + row * k, xb, k, k, sums[0]); break;
        default: dot_rows<4>(w + row * k, xb, k, k, sums[0]); break;
      }
      put(row, sums[0]);
    }
  }
}

// Waking a second thread costs microseconds, as much as reading a small matrix: split the rows
// only into blocks of at least `min_floats` weights (tunable: see set_min_floats_per_thread).
// 16K weights: a step of stories-1m (4 blocks of 128-wide layers, each matrix under 64K
// weights) took 0.14 ms on two cores of a Xeon against 0.18 with the matrices kept whole.
static int64_t min_floats = 1 << 14;
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
    dense_outputs(wp, k, begin, end, n, xp, m, nullptr, yp);
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
    for (size_t j = 0; j < wps.size(); ++j) {
      const int64_t lo = std::max(begin, offsets[j]), hi = std::min(end, offsets[j + 1]);
      if (lo < hi)
        dense_outputs(wps[j], k, lo - offsets[j], hi - offsets[j], offsets[j + 1] - offsets[j], xp, m, nullptr,
                      ys[j].data_ptr<float>());
    }
  });
  return ys;
}

// 2. int4_linear: y = x W^T with W stored as 4-bit codes, two to a byte (weight 2j in the low
// nibble, 2j+1 in the high one), and a scale and a zero point per group of `group` inputs:
// W[r, i] = scale[r, i / group] * (code[r, i] - zero[r, i / group]).
//
// Decoding reads every weight once per token, so the time is the weight traffic, and 4-bit
// moves an eighth of fp32's bytes -- provided the arithmetic keeps up, which a naive unpack
// to fp32 does not. As llama.cpp's Q4_0 x Q8_0 kernels do, x is quantized to int8 in blocks of
// 32 (one fp32 scale per block) and each block's dot product is done in integers: maddubs
// multiplies 32 unsigned codes by 32 signed x's and adds neighbours (16-bit), madd adds pairs
// again (32-bit) -- or one VNNI instruction does both, where the CPU has it -- and only then
// one conversion and one FMA per 32 weights. A few rows of x share each unpacked block. The
// zero point comes out of the sum once per group: sum (q - z) x = sum q x - z sum x. The
// packed order is matched by permuting x, not the weights: a block of x is stored as its 16
// even entries, then its 16 odd ones, the same order as [low nibbles | high nibbles] of 16
// packed bytes.
//
// Many rows of x (prefill) make the product compute-bound: then dequantize a tile of rows to
// fp32 and let PyTorch's GEMM do the arithmetic; the full fp32 weight is never materialised.
namespace {

constexpr int64_t kBlock = 32;

// The packed weight's tensors, checked once for every entry point: (n, k/2) uint8 codes,
// (n, k/group) fp32 scales, and zeros of the scales' shape or empty (symmetric codes).
void check_int4(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t k,
                int64_t group, const char* who) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(), who,
              ": contiguous uint8 (n, k/2) codes expected");
  TORCH_CHECK(packed.size(1) * 2 == k, who, ": codes ", packed.sizes(), " do not match input width ", k);
  TORCH_CHECK(group > 0 && group % kBlock == 0 && k % group == 0, who, ": group size ", group,
              " must be a multiple of 32 that divides ", k);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == packed.size(0) && scales.size(1) == k / group,
              who, ": contiguous fp32 scales of shape (", packed.size(0), ", ", k / group, ") expected");
  TORCH_CHECK(!zeros.numel() || (zeros.scalar_type() == torch::kUInt8 && zeros.is_contiguous() &&
                                 zeros.sizes() == scales.sizes()),
              who, ": zeros must be contiguous uint8 of the scales' shape");
}

// x (k) -> int8 codes (k, permuted as above), a scale per block, and per block its scale times
// the sum of its codes, which the zero-point term needs.
void quantize_x(const float* x, int64_t k, int8_t* xq, float* dx, float* block_sums) {
  int64_t j = 0;
#if defined(__AVX512F__)
  // Sixteen lanes at a time, the same numbers: IEEE division and round-to-nearest-even, as
  // below. The quantization runs on one thread before the product's threads start, a tenth
  // of a 4-bit decoding step done one number at a time (base-76M, 2 cores).
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  for (; j < k / kBlock; ++j) {
    const __m512 a = _mm512_loadu_ps(x + j * kBlock), b = _mm512_loadu_ps(x + j * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
    const float d = amax / 127.f;
    __m512i ca = _mm512_setzero_si512(), cb = _mm512_setzero_si512();
    if (d > 0.f) {
      const __m512 dv = _mm512_set1_ps(d);
      constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      ca = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(a, dv), nearest));
      cb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(b, dv), nearest));
    }
    const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(ca, cb));
    int8_t* q = xq + j * kBlock;  // the 16 even entries, then the 16 odd ones
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(ca, evens, cb)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(ca, odds, cb)));
    dx[j] = d;
    block_sums[j] = d * float(total);
  }
#endif
  for (; j < k / kBlock; ++j) {
    const float* xb = x + j * kBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    int32_t total = 0;
    for (int64_t i = 0; i < kBlock; ++i) {
      // Division, not multiplication by 1/d: the same rounding as the PyTorch reference.
      const int32_t c = d > 0.f ? int32_t(std::nearbyint(xb[i] / d)) : 0;
      xq[j * kBlock + (i % 2) * (kBlock / 2) + i / 2] = int8_t(c);
      total += c;
    }
    dx[j] = d;
    block_sums[j] = d * float(total);
  }
}

// The block sums added up per group of the weight: (groups) from (k / kBlock).
void sum_groups(const float* block_sums, int64_t k, int64_t group, float* group_sums) {
  const int64_t blocks_per_group = group / kBlock;
  for (int64_t g = 0; g < k / group; ++g) {
    group_sums[g] = 0.f;
    for (int64_t j = g * blocks_per_group; j < (g + 1) * blocks_per_group; ++j) group_sums[g] += block_sums[j];
  }
}

// x (m, k) quantized once for every int4 weight that multiplies it.
struct QuantizedX {
  int64_t m, k;
  std::vector<int8_t> xq;
  std::vector<float> dx, block_sums;
  QuantizedX(const float* x, int64_t m, int64_t k)
      : m(m), k(k), xq(m * k), dx(m * k / kBlock), block_sums(m * k / kBlock) {
    for (int64_t b = 0; b < m; ++b)
      quantize_x(x + b * k, k, xq.data() + b * k, dx.data() + b * k / kBlock, block_sums.data() + b * k / kBlock);
  }
  std::vector<float> group_sums(int64_t group) const {  // (m, k / group)
    std::vector<float> out(m * (k / group));
    for (int64_t b = 0; b < m; ++b) sum_groups(block_sums.data() + b * k / kBlock, k, group, out.data() + b * (k / group));
    return out;
  }
};

// One weight row against up to kRows rows of x at once: each block of codes is unpacked once
// and multiplied with every row, so a few rows cost little more than one. For row b, output
// sum over blocks of scale_g * dx_bj * (sum_i q_i xq_bi), minus the zero-point term.
constexpr int64_t kRows = 4;

#ifdef SLMLAB_AVX2
// Eight int32 sums of four products each, u8 codes times s8 x: one VNNI instruction where the
// CPU has it, else maddubs (pairs, 16-bit; no overflow: 2 * 15 * 127 < 2^15) and madd.
static inline __m256i dot_u8_s8(__m256i codes, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1));
#endif
}

// A row's four accumulators added up: (0 + 2) + (1 + 3), then the eight lanes. One order for
// every int4 loop, so that a row's output does not depend on which loop computed it.
static inline float int4_row_sum(const __m256 acc[4]) {
  const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(h);
}

template <int M>
void int4_rows_avx2(const uint8_t* w, const float* scales, int64_t k, int64_t group, const int8_t* xq,
                    const float* dx, float* sums) {
  const int64_t blocks_per_group = group / kBlock, blocks = k / kBlock;
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  // Four accumulators per row of x, block j's products into number j % 4: an FMA waits for
  // the one four blocks back, not the last (one chain: 4 cycles a block, the FMA's latency).
  __m256 acc[M][4];
  for (int b = 0; b < M; ++b) acc[b][0] = acc[b][1] = acc[b][2] = acc[b][3] = _mm256_setzero_ps();
  // The scale of the next block's group, counted along: no division per block.
  int64_t g = 0, left = blocks_per_group;
  auto next_scale = [&]() {
    const float s = scales[g];
    if (--left == 0) ++g, left = blocks_per_group;
    return s;
  };
  // Block j times the group's scale and x's block scale, in one FMA: (sum q x) * (s * dx).
  auto block = [&](int64_t j, float s, int a) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * kBlock / 2));
    const __m128i lo = _mm_and_si128(packed, low_nibbles);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles);
    const __m256i codes = _mm256_set_m128i(hi, lo);
    for (int b = 0; b < M; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * k + j * kBlock));
      acc[b][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(codes, xv)), _mm256_set1_ps(s * dx[b * blocks + j]),
                                  acc[b][a]);
    }
  };
  int64_t j = 0;
  for (; j + 4 <= blocks; j += 4) {
    // Ask for the codes a 4 KB page ahead, one 64-byte line per 4 blocks. The hardware's
    // prefetcher stops at each page boundary and, with the arithmetic a byte of codes costs,
    // does not catch up: without this the product reads DRAM at a third of its bandwidth
    // (SmolLM2-135M in int4, 2 cores of a Xeon: a decoded token in 16 ms without, 8 with).
    _mm_prefetch(reinterpret_cast<const char*>(w + j * kBlock / 2 + 4096), _MM_HINT_T0);
    block(j, next_scale(), 0);
    block(j + 1, next_scale(), 1);
    block(j + 2, next_scale(), 2);
    block(j + 3, next_scale(), 3);
  }
  if (j < blocks) block(j++, next_scale(), 0);  // the last one to three blocks
  if (j < blocks) block(j++, next_scale(), 1);
  if (j < blocks) block(j++, next_scale(), 2);
  for (int b = 0; b < M; ++b) sums[b] = int4_row_sum(acc[b]);
}

// R rows of W against a single row of x (decoding one sequence): each row's blocks, scales,
// accumulators and sums exactly as int4_rows_avx2<1> computes them, so its output is the same
// to the bit; the rows are interleaved and share each block of x. A row alone is a short
// chain of dependent sums (SmolLM2-135M's rows are 18 or 48 blocks) that the core waits on:
// its blocks in int4 decoded no faster from cache than from memory, about 150 us a block of
// 3.5M weights on 2 cores of a Xeon; four rows at a time, 135 us, and the whole model 200
// tokens/s against 178.
template <int R>
void int4_row_group_avx2(const uint8_t* w, const float* scales, int64_t k, int64_t group, const int8_t* xq,
                         const float* dx, float* sums) {
  const int64_t blocks_per_group = group / kBlock, blocks = k / kBlock, groups = k / group;
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_ps();
  int64_t g = 0, left = blocks_per_group;
  auto block = [&](int64_t j, int a) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j * kBlock));
    for (int r = 0; r < R; ++r) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * k / 2 + j * kBlock / 2));
      const __m256i codes =
          _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles), _mm_and_si128(packed, low_nibbles));
      acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(codes, xv)),
                                  _mm256_set1_ps(scales[r * groups + g] * dx[j]), acc[r][a]);
    }
    if (--left == 0) ++g, left = blocks_per_group;
  };
  int64_t j = 0;
  for (; j + 4 <= blocks; j += 4) {
    for (int r = 0; r < R; ++r)  // see int4_rows_avx2
      _mm_prefetch(reinterpret_cast<const char*>(w + r * k / 2 + j * kBlock / 2 + 4096), _MM_HINT_T0);
    block(j, 0);
    block(j + 1, 1);
    block(j + 2, 2);
    block(j + 3, 3);
  }
  if (j < blocks) block(j++, 0);
  if (j < blocks) block(j++, 1);
  if (j < blocks) block(j++, 2);
  for (int r = 0; r < R; ++r) sums[r] = int4_row_sum(acc[r]);
}
#endif

#if defined(SLMLAB_AVX2) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SLMLAB_AVX512 1
// Sixteen int32 sums of four products each: dot_u8_s8 over a 512-bit register.
static inline __m512i dot_u8_s8_x4(__m512i codes, __m512i x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, x);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(codes, x), _mm512_set1_epi16(1));
#endif
}

// The first n of 64 bytes.
static inline __mmask64 first_bytes(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// R rows of W against M rows of x (one of them 1), four blocks at a time in the 512-bit
// registers: the 64 bytes of codes of four blocks, their low nibbles against the four blocks'
// even entries of x and their high nibbles against the odd ones, two products for 128
// weights. Each product's lanes are, per block, the four sums dot_u8_s8 puts in the low (or
// high) half of its eight, and each lane takes the same FMA with the same factor (the block's
// group scale times x's block scale), so the four blocks' lanes, put back together, are
// int4_row_group_avx2's and int4_rows_avx2's four accumulators to the bit. About half their
// instructions a weight; on one core of an AMD EPYC, codes in cache, 27 billion weights/s for
// rows of 576 inputs against 21.5, 37 for 1536 against 26, SmolLM2-135M's 4-bit head from
// memory 32 against 24. (Two blocks at a time, each one's codes shuffled into place and its
// scale spread out on its own, got about half as far.)
template <int R, int M>
void int4_tile_avx512(const uint8_t* w, const float* scales, int64_t k, int64_t group, const int8_t* xq,
                      const float* dx, float* sums) {
  static_assert(R == 1 || M == 1, "a tile is rows of W against one row of x, or the reverse");
  const int64_t blocks_per_group = group / kBlock, blocks = k / kBlock, groups = k / group;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512i quarters = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  // acc[r][b][0]: lanes 0-3 of the four accumulators, a quarter each; [1]: lanes 4-7.
  __m512 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < M; ++b) acc[r][b][0] = acc[r][b][1] = _mm512_setzero_ps();
  int64_t g = 0, left = blocks_per_group;  // block j's group, counted along as there
  auto next_group = [&]() {
    const int64_t at = g;
    if (--left == 0) ++g, left = blocks_per_group;
    return at;
  };
  // Blocks j to j + n - 1 (n <= 4; under 4 only at the end, where the missing blocks' lanes
  // take products of nothing, fma(0, 0, acc): acc unchanged, and the loads stay in bounds).
  auto quad = [&](int64_t j, int64_t n) {
    const bool all = n == 4;
    const __mmask16 floats = __mmask16((1u << n) - 1);
    __m512i even[M], odd[M];
    __m128 d[M];
    for (int b = 0; b < M; ++b) {  // x's blocks are [16 even | 16 odd] each: regrouped
      const int8_t* x = xq + b * k + j * kBlock;
      const __m512i x01 = all ? _mm512_loadu_si512(x) : _mm512_maskz_loadu_epi8(first_bytes(32 * n), x);
      const __m512i x23 = all ? _mm512_loadu_si512(x + 64)
                        : n > 2 ? _mm512_maskz_loadu_epi8(first_bytes(32 * n - 64), x + 64)
                                : _mm512_setzero_si512();
      even[b] = _mm512_shuffle_i64x2(x01, x23, _MM_SHUFFLE(2, 0, 2, 0));
      odd[b] = _mm512_shuffle_i64x2(x01, x23, _MM_SHUFFLE(3, 1, 3, 1));
      d[b] = all ? _mm_loadu_ps(dx + b * blocks + j) : _mm_maskz_loadu_ps(floats, dx + b * blocks + j);
    }
    int64_t at[4];
    for (int q = 0; q < 4; ++q) at[q] = q < n ? next_group() : at[0];
    for (int r = 0; r < R; ++r) {
      const uint8_t* codes = w + r * k / 2 + j * kBlock / 2;
      _mm_prefetch(reinterpret_cast<const char*>(codes + 4096), _MM_HINT_T0);  // see int4_rows_avx2
      const float* s = scales + r * groups;
      __m128 sg;  // the four blocks' group scales
      if (blocks_per_group == 1)
        sg = all ? _mm_loadu_ps(s + at[0]) : _mm_maskz_loadu_ps(floats, s + at[0]);
      else if (blocks_per_group % 4 == 0)
        sg = _mm_set1_ps(s[at[0]]);
      else
        sg = _mm_setr_ps(s[at[0]], s[at[1]], s[at[2]], s[at[3]]);
      const __m512i packed = all ? _mm512_loadu_si512(codes) : _mm512_maskz_loadu_epi8(first_bytes(16 * n), codes);
      const __m512i low = _mm512_and_si512(packed, low_nibbles);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
      for (int b = 0; b < M; ++b) {
        const __m512 f = _mm512_permutexvar_ps(quarters, _mm512_castps128_ps512(_mm_mul_ps(sg, d[b])));
        acc[r][b][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_u8_s8_x4(low, even[b])), f, acc[r][b][0]);
        acc[r][b][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_u8_s8_x4(high, odd[b])), f, acc[r][b][1]);
      }
    }
  };
  int64_t j = 0;
  for (; j + 4 <= blocks; j += 4) quad(j, 4);
  if (j < blocks) quad(j, blocks - j);
  const __m512i lanes[4] = {  // accumulator a: quarter a of the low lanes, then of the high
      _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 0, 0, 0, 0, 0, 0, 0, 0),
      _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 0, 0, 0, 0, 0, 0, 0, 0),
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 0, 0, 0, 0, 0, 0, 0, 0),
      _mm512_setr_epi32(12, 13, 14, 15, 28, 29, 30, 31, 0, 0, 0, 0, 0, 0, 0, 0)};
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < M; ++b) {
      __m256 a[4];
      for (int q = 0; q < 4; ++q)
        a[q] = _mm512_castps512_ps256(_mm512_permutex2var_ps(acc[r][b][0], lanes[q], acc[r][b][1]));
      sums[r + b] = int4_row_sum(a);
    }
}
#endif

// The portable path: the same sums, one at a time.
float int4_row_portable(const uint8_t* w, const float* scales, int64_t k, int64_t group, const int8_t* xq,
                        const float* dx) {
  const int64_t blocks_per_group = group / kBlock, groups = k / group;
  float sum = 0.f;
  for (int64_t g = 0, j = 0; g < groups; ++g) {
    float group_sum = 0.f;
    for (const int64_t end = j + blocks_per_group; j < end; ++j) {
      const uint8_t* wb = w + j * kBlock / 2;
      const int8_t* xb = xq + j * kBlock;
      int32_t total = 0;
      for (int64_t i = 0; i < kBlock / 2; ++i)
        total += int32_t(wb[i] & 0x0F) * xb[i] + int32_t(wb[i] >> 4) * xb[kBlock / 2 + i];
      group_sum += dx[j] * float(total);
    }
    sum += scales[g] * group_sum;
  }
  return sum;
}

#ifdef SLMLAB_AVX2
// The zero-point terms of R consecutive outputs (their scales and zeros `groups` apart), as
// zero_point_term computes each, the R chains of sums side by side: one at a time, each waited
// on its own additions (a sixth of the decoding product's time, SmolLM2-135M on an EPYC).
template <int R>
void zero_point_terms(const float* s, const uint8_t* z, const float* group_sums, int64_t groups, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 sums = _mm256_loadu_ps(group_sums + g);
    for (int r = 0; r < R; ++r) {
      const __m256 zv =
          z ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + r * groups + g))))
            : _mm256_set1_ps(8.f);
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + r * groups + g), zv), sums, acc[r]);
    }
  }
  __m128 total[R];
  for (int r = 0; r < R; ++r) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    h = _mm_hadd_ps(h, h);
    total[r] = _mm_hadd_ps(h, h);
  }
  // One FMA a group for the last few, in every build: written as `total += s * z * sum`, GCC
  // fused the product and the sum for some targets and zero points and not for others, and an
  // AVX2 build's outputs differed from an AVX-512 build's in the last bit.
  for (; g < groups; ++g)
    for (int r = 0; r < R; ++r) {
      const __m128 sz = _mm_mul_ss(_mm_set_ss(s[r * groups + g]), _mm_set_ss(float(z ? z[r * groups + g] : 8)));
      total[r] = _mm_fmadd_ss(sz, _mm_set_ss(group_sums[g]), total[r]);
    }
  for (int r = 0; r < R; ++r) out[r] = _mm_cvtss_f32(total[r]);
}
#endif

// The zero-point term of one output: sum over groups of scale * zero * (the group's sum of x).
// Per output and row of x, it is a dot product as long as the groups: vectorised, it costs a
// few instructions instead of a tenth of the row's time.
float zero_point_term(const float* s, const uint8_t* z, const float* group_sums, int64_t groups, bool vector) {
  float total = 0.f;
#ifdef SLMLAB_AVX2
  if (vector) {
    zero_point_terms<1>(s, z, group_sums, groups, &total);
    return total;
  }
#endif
  for (int64_t g = 0; g < groups; ++g) total += s[g] * float(z ? z[g] : 8) * group_sums[g];
  return total;
}

// Output `row` of W (n rows) for every row of the quantized x: y[b * n + row], plus `bias`.
void int4_outputs(const uint8_t* codes, const float* scales, const uint8_t* zeros, int64_t k, int64_t group,
                  int64_t row, int64_t n, const QuantizedX& qx, const float* group_sums, const float* bias,
                  bool vector, float* y) {
  const int64_t groups = k / group;
  const uint8_t* w = codes + row * k / 2;
  const float* s = scales + row * groups;
  const uint8_t* z = zeros ? zeros + row * groups : nullptr;
  float sums[kRows];
  for (int64_t b0 = 0; b0 < qx.m; b0 += kRows) {
    const int64_t rows = std::min(kRows, qx.m - b0);
    const int8_t* xq = qx.xq.data() + b0 * k;
    const float* dx = qx.dx.data() + b0 * (k / kBlock);
    bool done = false;
#if defined(SLMLAB_AVX512)
    if (vector) {
      switch (rows) {
        case 1: int4_tile_avx512<1, 1>(w, s, k, group, xq, dx, sums); break;
        case 2: int4_tile_avx512<1, 2>(w, s, k, group, xq, dx, sums); break;
        case 3: int4_tile_avx512<1, 3>(w, s, k, group, xq, dx, sums); break;
        default: int4_tile_avx512<1, 4>(w, s, k, group, xq, dx, sums); break;
      }
      done = true;
    }
#elif defined(SLMLAB_AVX2)
    if (vector) {
      switch (rows) {
        case 1: int4_rows_avx2<1>(w, s, k, group, xq, dx, sums); break;
        case 2: int4_rows_avx2<2>(w, s, k, group, xq, dx, sums); break;
        case 3: int4_rows_avx2<3>(w, s, k, group, xq, dx, sums); break;
        default: int4_rows_avx2<4>(w, s, k, group, xq, dx, sums); break;
      }
      done = true;
    }
#endif
    if (!done)
      for (int64_t b = 0; b < rows; ++b) sums[b] = int4_row_portable(w, s, k, group, xq + b * k, dx + b * (k / kBlock));
    for (int64_t b = 0; b < rows; ++b) {
      // sum (q - z) x = sum q x - z sum x, the second term per group.
      const float v = sums[b] - zero_point_term(s, z, group_sums + (b0 + b) * groups, groups, vector);
      y[(b0 + b) * n + row] = bias ? v + bias[row] : v;
    }
  }
}

// Rows of W interleaved for a single row of x: as many as the registers hold (16 vector
// registers with AVX2, 32 with AVX-512; four accumulators a row, two 512-bit ones in
// int4_tile_avx512, where eight rows came no faster than four), where rows are short. A long
// row is chain enough, and four streams of codes read from memory at once came slower than
// one: a 4096-by-4096 layer, out of cache, 0.79 ms against 0.47 (a 2048-wide model's decoding
// was no faster either way).
#if defined(__AVX512F__)
constexpr int kRowsOfW = 4;
#else
constexpr int kRowsOfW = 2;
#endif
constexpr int64_t kShortRow = 2048;  // inputs

// Outputs [begin, end) of W (n rows) for every row of the quantized x, into y (m, n): for a
// single row of x and short rows, kRowsOfW rows of W at a time: the same numbers as
// int4_outputs.
void int4_output_rows(const uint8_t* codes, const float* scales, const uint8_t* zeros, int64_t k, int64_t group,
                      int64_t begin, int64_t end, int64_t n, const QuantizedX& qx, const float* group_sums,
                      const float* bias, bool vector, float* y) {
  int64_t row = begin;
#ifdef SLMLAB_AVX2
  if (vector && qx.m == 1 && k < kShortRow) {
    const int64_t groups = k / group;
    float sums[kRowsOfW];
    for (; row + kRowsOfW <= end; row += kRowsOfW) {
#ifdef SLMLAB_AVX512
      int4_tile_avx512<kRowsOfW, 1>(codes + row * k / 2, scales + row * groups, k, group, qx.xq.data(),
                                      qx.dx.data(), sums);
#else
      int4_row_group_avx2<kRowsOfW>(codes + row * k / 2, scales + row * groups, k, group, qx.xq.data(),
                                    qx.dx.data(), sums);
#endif
      float terms[kRowsOfW];
      zero_point_terms<kRowsOfW>(scales + row * groups, zeros ? zeros + row * groups : nullptr, group_sums, groups,
                                 terms);
      for (int r = 0; r < kRowsOfW; ++r) {
        const float v = sums[r] - terms[r];
        y[row + r] = bias ? v + bias[row + r] : v;
      }
    }
  }
#endif
  for (; row < end; ++row) int4_outputs(codes, scales, zeros, k, group, row, n, qx, group_sums, bias, vector, y);
}

void dequantize_rows(const uint8_t* w, const float* scales, const uint8_t* zeros, int64_t k, int64_t group,
                     int64_t begin, int64_t end, float* out) {
  const int64_t groups = k / group;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* wr = w + r * k / 2;
    float* o = out + (r - begin) * k;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scales[r * groups + g], z = float(zeros ? zeros[r * groups + g] : 8);
      for (int64_t i = g * group / 2; i < (g + 1) * group / 2; ++i) {
        o[2 * i] = s * (float(wr[i] & 0x0F) - z);
        o[2 * i + 1] = s * (float(wr[i] >> 4) - z);
      }
    }
  }
}

}  // namespace

// 3. sparse24_linear: y = x W^T for a W with 2:4 sparsity (at most two nonzero weights in every
// four consecutive inputs of a row), stored packed: each row keeps its k/2 kept values (fp32)
// and their positions within their groups, 2 bits each, four to a byte (k/8 bytes). Byte j of
// a row covers inputs 8j..8j+7, the groups 2j and 2j+1; its bits 2t..2t+1 place kept value
// 4j+t in group 2j + t/2. 2.125 bytes a weight where dense fp32 has 4: a bandwidth-bound
// product reads 53% of the bytes.
//
// The kept values meet their inputs by a permutation in registers, not a gather from memory:
// 16 inputs (two AVX registers, four groups) hold every input their 8 kept values need;
// values 0-3 come from the first register and 4-7 from the second, value t from lane
// 4 * (t/2 % 2) + position. So one 16-bit word of positions becomes a lane index vector (a
// variable shift, a mask and an add), both registers are permuted by it, and a blend takes
// the first four lanes from the one and the last four from the other.
namespace {

void check_sparse24(const torch::Tensor& values, const torch::Tensor& indices, int64_t k, const char* who) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 && values.dim() == 2 && values.is_contiguous(), who,
              ": contiguous fp32 (n, k/2) values expected");
  TORCH_CHECK(k % 8 == 0 && values.size(1) * 2 == k, who, ": values ", values.sizes(),
              " do not match input width ", k, " (a multiple of 8)");
  TORCH_CHECK(indices.scalar_type() == torch::kUInt8 && indices.dim() == 2 && indices.is_contiguous() &&
                  indices.size(0) == values.size(0) && indices.size(1) * 8 == k,
              who, ": contiguous uint8 positions of shape (", values.size(0), ", ", k / 8, ") expected");
}

// Inputs [0, k) of one row against one row of x, one kept value at a time.
float sparse24_row_portable(const float* v, const uint8_t* idx, const float* x, int64_t k) {
  float sum = 0.f;
  for (int64_t j = 0; j < k / 8; ++j)
    for (int t = 0; t < 4; ++t) sum += v[4 * j + t] * x[8 * j + 4 * (t / 2) + ((idx[j] >> (2 * t)) & 3)];
  return sum;
}

#if defined(__AVX512F__)
// With AVX-512 one register holds 32 inputs, eight groups, and a single two-source permutation
// picks all 16 kept values' inputs: a third of the AVX2 loop's instructions per weight.
template <int M>
void sparse24_rows_avx512(const float* v, const uint8_t* idx, const float* x, int64_t k, float* sums) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i lanes = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[M][2];
  for (int b = 0; b < M; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    for (int u = 0; u < 2; ++u) {
      const int64_t at = i + 32 * u;
      uint32_t word;
      std::memcpy(&word, idx + at / 8, 4);
      const __m512i perm = _mm512_add_epi32(
          _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), shifts), three), lanes);
      const __m512 w = _mm512_loadu_ps(v + at / 2);
      for (int b = 0; b < M; ++b) {
        const __m512 picked =
            _mm512_permutex2var_ps(_mm512_loadu_ps(x + b * k + at), perm, _mm512_loadu_ps(x + b * k + at + 16));
        acc[b][u] = _mm512_fmadd_ps(w, picked, acc[b][u]);
      }
    }
  }
  for (int b = 0; b < M; ++b)
    sums[b] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1])) +
              sparse24_row_portable(v + i / 2, idx + i / 8, x + b * k + i, k - i);
}
#endif

#ifdef SLMLAB_AVX2
// One weight row against M rows of x: each word of positions is decoded once for all of them.
template <int M>
void sparse24_rows_avx2(const float* v, const uint8_t* idx, const float* x, int64_t k, float* sums) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i lanes = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[M][2];
  for (int b = 0; b < M; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
  int64_t i = 0;
  // Two blocks of 16 inputs per turn, into two accumulators: the FMAs' latency overlaps.
  for (; i + 32 <= k; i += 32) {
    for (int u = 0; u < 2; ++u) {
      const int64_t at = i + 16 * u;
      uint16_t word;
      std::memcpy(&word, idx + at / 8, 2);
      const __m256i perm = _mm256_add_epi32(
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), three), lanes);
      const __m256 w = _mm256_loadu_ps(v + at / 2);
      for (int b = 0; b < M; ++b) {
        const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + b * k + at), perm);
        const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + b * k + at + 8), perm);
        acc[b][u] = _mm256_fmadd_ps(w, _mm256_blend_ps(lo, hi, 0xF0), acc[b][u]);
      }
    }
  }
  for (int b = 0; b < M; ++b) {
    const __m256 a = _mm256_add_ps(acc[b][0], acc[b][1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    // The last inputs (k not a multiple of 32) one at a time: the layout is the same there.
    sums[b] = _mm_cvtss_f32(h) + sparse24_row_portable(v + i / 2, idx + i / 8, x + b * k + i, k - i);
  }
}
#endif

// Output `row` of W (n rows) for each of the m rows of x: y[b * n + row], plus `bias`.
void sparse24_outputs(const float* values, const uint8_t* indices, int64_t k, int64_t row, int64_t n,
                      const float* x, int64_t m, const float* bias, bool vector, float* y) {
  const float* v = values + row * (k / 2);
  const uint8_t* idx = indices + row * (k / 8);
  float sums[kRows];
  for (int64_t b0 = 0; b0 < m; b0 += kRows) {
    const int64_t rows = std::min(kRows, m - b0);
    const float* xb = x + b0 * k;
    bool done = false;
#if defined(__AVX512F__)
    if (vector) {
      switch (rows) {
        case 1: sparse24_rows_avx512<1>(v, idx, xb, k, sums); break;
        case 2: sparse24_rows_avx512<2>(v, idx, xb, k, sums); break;
        case 3: sparse24_rows_avx512<3>(v, idx, xb, k, sums); break;
        default: sparse24_rows_avx512<4>(v, idx, xb, k, sums); break;
      }
      done = true;
    }
#elif defined(SLMLAB_AVX2)
    if (vector) {
      switch (rows) {
        case 1: sparse24_rows_avx2<1>(v, idx, xb, k, sums); break;
        case 2: sparse24_rows_avx2<2>(v, idx, xb, k, sums); break;
        case 3: sparse24_rows_avx2<3>(v, idx, xb, k, sums); break;
        default: sparse24_rows_avx2<4>(v, idx, xb, k, sums); break;
      }
      done = true;
    }
#endif
    if (!done)
      for (int64_t b = 0; b < rows; ++b) sums[b] = sparse24_row_portable(v, idx, xb + b * k, k);
    for (int64_t b = 0; b < rows; ++b) y[(b0 + b) * n + row] = bias ? sums[b] + bias[row] : sums[b];
  }
}

// Rows [begin, end) of the dense weight, zeros included, into `out` ((end - begin), k).
void unpack_sparse24_rows(const float* values, const uint8_t* positions, int64_t k, int64_t begin, int64_t end,
                          float* out) {
  for (int64_t r = begin; r < end; ++r) {
    const float* v = values + r * (k / 2);
    const uint8_t* idx = positions + r * (k / 8);
    float* o = out + (r - begin) * k;
    std::fill(o, o + k, 0.f);
    for (int64_t j = 0; j < k / 8; ++j)
      for (int t = 0; t < 4; ++t) o[8 * j + 4 * (t / 2) + ((idx[j] >> (2 * t)) & 3)] = v[4 * j + t];
  }
}

}  // namespace

// 4. decode_step: every block of a Llama-family decoder for a few new tokens per row.
//
// The same computation as DecoderBlock.forward in slmlab/models/decoder.py, which is its
// reference in the tests, written as one call so that a token costs one trip from Python
// instead of dozens of small operator dispatches. Weights stay where PyTorch keeps them.
// One token per row is decoding; a few (T) per row continue the cache causally, which is how
// a speculative step checks a draft: every weight is still read once for all of them, and each
// token's numbers are computed exactly as if it had come alone.
namespace {

void rms_norm(const float* x, const float* w, float* out, int64_t d, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < d; ++i) ss += double(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(float(ss / d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = w[i] * (x[i] * r);
}

// scores[j] = keys[j] . q for the S keys (D apart). A head is a few dozen numbers, so one
// key's product is mostly the adding up of its lanes; with AVX-512, four keys' lanes are
// added up together (a tree of shuffles) instead of one key's at a time. A key's score comes
// out of the same instructions whichever of the four it is, so it does not depend on how many
// keys or tokens came with it.
void key_scores(const float* keys, const float* q, int64_t D, int64_t S, float* scores) {
#ifdef SLMLAB_DENSE_PAIRS
  if (D % 16 == 0) {
    alignas(64) float lanes[16];
    for (int64_t j0 = 0; j0 < S; j0 += 4) {
      __m512 acc[4];
      const float* kp[4];
      for (int t = 0; t < 4; ++t) {
        kp[t] = keys + std::min(j0 + t, S - 1) * D;  // past the end: the last key again
        acc[t] = _mm512_mul_ps(_mm512_loadu_ps(kp[t]), _mm512_loadu_ps(q));
      }
      for (int64_t i = 16; i < D; i += 16)
        for (int t = 0; t < 4; ++t) acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(kp[t] + i), _mm512_loadu_ps(q + i), acc[t]);
      // 128-bit quarters: [a0+a2, a1+a3, b0+b2, b1+b3] and the same of c, d; then [a, b, c, d].
      const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(acc[0], acc[1], 0x44), _mm512_shuffle_f32x4(acc[0], acc[1], 0xEE));
      const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2], acc[3], 0x44), _mm512_shuffle_f32x4(acc[2], acc[3], 0xEE));
      __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
      u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));  // within each quarter: [0+2, 1+3, ...]
      u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));  // ... and the two sums added
      _mm512_store_ps(lanes, u);
      for (int64_t t = 0; t < 4 && j0 + t < S; ++t) scores[j0 + t] = lanes[4 * t];
    }
    return;
  }
#endif
  for (int64_t j = 0; j < S; ++j) scores[j] = dot_row(keys + j * D, q, D);
}

#ifdef SLMLAB_DENSE_PAIRS
// e^x for 16 floats: x = n ln 2 + r, |r| <= ln 2 / 2, e^r by Cephes' expf polynomial (within
// 2 ulp of std::exp), times 2^n. Below -87 (where e^x leaves the normal floats) gives e^-87.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}
#endif

// One query's attention to the keys and values of positions [0, self] where `mask` is true
// (and to itself always, as the blocks' mask lets a padding query do), into out (D):
// softmax(k . q * scale) v. `p` holds self + 17 floats of scratch. With AVX-512 and D a
// multiple of 16 up to 128 the softmax and the weighted sum run 16 lanes at a time: a 4-token
// step of stories-8m at 200 cached tokens took 1.08 ms with the scalar loops, 0.99 with these
// and 0.81 with no attention at all. Positions before `first` (at most self) must all be
// masked: they are skipped, and the lanes count from `first`. A batch's rows share one cache,
// and a row that came late (or a left-padded prompt) has a masked front: counted from its
// first real key, its sums are added up in the lanes they would have alone, and the row's
// numbers are those of its tokens alone to the bit.
void attend(const float* keys, const float* values, const float* q, const bool* mask, int64_t first, int64_t self,
            int64_t D, float scale, float* p, float* out) {
  const int64_t S = self + 1;
  key_scores(keys + first * D, q, D, S - first, p + first);
  float best = -INFINITY;
  for (int64_t j = first; j < S; ++j) {
    p[j] = mask[j] || j == self ? p[j] * scale : -INFINITY;
    best = std::max(best, p[j]);
  }
#ifdef SLMLAB_DENSE_PAIRS
  if (D % 16 == 0 && D <= 128) {
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), top = _mm512_set1_ps(best);
    __m512 sums = _mm512_setzero_ps();
    for (int64_t j = S; j < first + (S - first + 15) / 16 * 16; ++j) p[j] = -INFINITY;
    for (int64_t j = first; j < S; j += 16) {
      const __m512 v = _mm512_loadu_ps(p + j);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, neg_inf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(v, top)));
      _mm512_storeu_ps(p + j, e);
      sums = _mm512_add_ps(sums, e);
    }
    const float inverse = 1.0f / _mm512_reduce_add_ps(sums);
    __m512 acc[8];
    const int64_t chunks = D / 16;
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t j = first; j < S; ++j) {
      if (p[j] == 0.f) continue;
      const __m512 w = _mm512_set1_ps(p[j] * inverse);
      for (int64_t c = 0; c < chunks; ++c)
        acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(values + j * D + 16 * c), acc[c]);
    }
    for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
    return;
  }
#endif
  float total = 0.f;
  for (int64_t j = first; j < S; ++j) total += (p[j] = p[j] == -INFINITY ? 0.f : std::exp(p[j] - best));
  std::fill(out, out + D, 0.f);
  for (int64_t j = first; j < S; ++j) {
    if (p[j] == 0.f) continue;
    const float w = p[j] / total;
    const float* vj = values + j * D;
    for (int64_t i = 0; i < D; ++i) out[i] += w * vj[i];
  }
}

// x (D) rotated in place: x*cos + roll(x, D/2)*signed_sin, as apply_rope in rope.py.
void rope(float* x, const float* cos, const float* sin, int64_t D, float* tmp) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < D; ++i) tmp[i] = x[i] * cos[i] + x[(i + h) % D] * sin[i];
  std::copy(tmp, tmp + D, x);
}

// One linear layer of a block: an fp32 weight (n, k), int4 codes (n, k/2) with their group
// scales and zero points (section 2), or 2:4 values (n, k/2) with their positions (section 3),
// passed as three tensors: {weight, empty, empty}, {codes, scales, zeros or empty} or
// {values, positions, empty}. The group size is k / (scales per row).
struct Linear {
  int64_t rows = 0, group = 0;
  const float* weight = nullptr;
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;
  const uint8_t* zeros = nullptr;
  const float* values = nullptr;
  const uint8_t* positions = nullptr;
};

Linear as_linear(const std::vector<torch::Tensor>& L, size_t at, int64_t k) {
  const torch::Tensor& w = L[at];
  Linear out;
  out.rows = w.size(0);
  if (w.scalar_type() == torch::kUInt8) {
    const torch::Tensor &scales = L[at + 1], &zeros = L[at + 2];
    TORCH_CHECK(scales.dim() == 2 && scales.size(1) > 0, "decode_step: int4 scales must be (n, groups)");
    out.group = k / scales.size(1);
    check_int4(w, scales, zeros, k, out.group, "decode_step");
    out.codes = w.data_ptr<uint8_t>();
    out.scales = scales.data_ptr<float>();
    out.zeros = zeros.numel() ? zeros.data_ptr<uint8_t>() : nullptr;
  } else if (L[at + 1].numel()) {
    check_sparse24(w, L[at + 1], k, "decode_step");
    out.values = w.data_ptr<float>();
    out.positions = L[at + 1].data_ptr<uint8_t>();
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.size(1) == k,
                "decode_step: contiguous fp32 weights expected");
    out.weight = w.data_ptr<float>();
  }
  return out;
}

// y[m, n] = x[m, k] W[n, k]^T (+ bias), over the rows of several weights at once. x is
// quantized to int8 blocks once for all the int4 weights among them.
void project(const float* x, int64_t m, int64_t k, const std::vector<Linear>& w,
             const std::vector<const float*>& bias, const std::vector<float*>& y) {
  std::vector<int64_t> offsets{0};
  bool any_int4 = false;
  // What one thread's share is sized by: the most work a row takes, in fp32 weights' worth.
  // An int4 weight costs about what an fp32 one does (fewer bytes, more arithmetic): counted
  // by its bytes, a 576-wide layer went to one thread, and stories-8m in int4 decoded no
  // faster on two cores than on one.
  int64_t row_floats = 0;
  for (auto& l : w) {
    offsets.push_back(offsets.back() + l.rows);
    any_int4 |= l.codes != nullptr;
    row_floats = std::max(row_floats, l.values ? k / 2 : k);
  }
  std::unique_ptr<QuantizedX> qx;
  std::vector<std::vector<float>> group_sums(w.size());
  if (any_int4) {
    qx = std::make_unique<QuantizedX>(x, m, k);
    for (size_t j = 0; j < w.size(); ++j)
      if (w[j].codes) group_sums[j] = qx->group_sums(w[j].group);
  }
  at::parallel_for(0, offsets.back(), grain_rows(row_floats), [&](int64_t begin, int64_t end) {
    for (size_t j = 0; j < w.size(); ++j) {
      const Linear& l = w[j];
      const int64_t lo = std::max(begin, offsets[j]) - offsets[j], hi = std::min(end, offsets[j + 1]) - offsets[j];
      if (lo >= hi) continue;
      if (l.weight) {
        dense_outputs(l.weight, k, lo, hi, l.rows, x, m, bias[j], y[j]);
        continue;
      }
      if (l.codes) {
        int4_output_rows(l.codes, l.scales, l.zeros, k, l.group, lo, hi, l.rows, *qx, group_sums[j].data(), bias[j],
                         true, y[j]);
        continue;
      }
      for (int64_t row = lo; row < hi; ++row)
        sparse24_outputs(l.values, l.positions, k, row, l.rows, x, m, bias[j], true, y[j]);
    }
  });
}

const float* opt(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// fn(r) for the rows r in [0, R), split between threads where the rows hold enough work to
// pay for waking them (`floats` per row, in the units of `grain_rows`). A row's arithmetic
// does not change with the split. Between the products, a step's norms, rotations and
// activations ran on one thread while the other waited: at 32 rows of stories-8m a quarter
// of the step (perf: libgomp's spinning beside rms_norm, expf and the copies).
template <typename F>
void for_rows(int64_t R, int64_t floats, const F& fn) {
  const int64_t grain = grain_rows(floats);
  if (R <= grain) {
    for (int64_t r = 0; r < R; ++r) fn(r);
    return;
  }
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r);
  });
}

// The rows `ids` of an embedding table given as one projection's three tensors (see Linear):
// fp32 rows copied; int4 rows dequantized, scale * (code - zero), as
// `slmlab.layers.formats.dequantize` computes them, so that the lookup is the table's own.
torch::Tensor embed_rows(const torch::Tensor& ids, const std::vector<torch::Tensor>& embedding) {
  TORCH_CHECK(embedding.size() == 3, "decode_step: the embedding's three tensors expected");
  const torch::Tensor& table = embedding[0];
  TORCH_CHECK(table.dim() == 2, "decode_step: a (vocab, d) embedding expected");
  const int64_t vocab = table.size(0), d = table.scalar_type() == torch::kUInt8 ? 2 * table.size(1) : table.size(1);
  const Linear e = as_linear(embedding, 0, d);
  TORCH_CHECK(e.weight || e.codes, "decode_step: an fp32 or int4 embedding expected");
  const int64_t n = ids.numel(), groups = e.codes ? d / e.group : 0;
  auto x = torch::empty({n, d}, torch::kFloat32);
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    const int64_t id = idp[r];
    TORCH_CHECK(id >= 0 && id < vocab, "decode_step: token id ", id, " is not in [0, ", vocab, ")");
    float* out = x.data_ptr<float>() + r * d;
    if (e.weight) {
      std::copy_n(e.weight + id * d, d, out);
      continue;
    }
    const uint8_t* codes = e.codes + id * d / 2;
    const float* scales = e.scales + id * groups;
    for (int64_t i = 0; i < d; ++i) {
      const int64_t g = i / e.group;
      const float zero = e.zeros ? float(e.zeros[id * groups + g]) : 8.f;
      const uint8_t code = i % 2 ? codes[i / 2] >> 4 : codes[i / 2] & 0x0F;
      out[i] = (float(code) - zero) * scales[g];
    }
  }
  return x;
}

}  // namespace

// x: (B * T, d) embeddings of the new tokens, T consecutive ones per row (row b's token t at
// b * T + t), placed in the cache from position `length`; or, with `row_tokens` (B counts, 1
// or more; empty: T each), row b's T_b tokens one after the other, placed at positions
// length + T - T_b to length + T - 1, so that every row's last token lands at the same place
// (a newcomer's whole prompt beside the running rows' one token each, as chunked-prefill
// servers batch them). Or x empty and `ids` (as many) their ids in `embedding`, the (vocab, d)
// table as one projection's three tensors (see Linear: fp32 rows, or int4 rows dequantized as
// they are read); returns the residual stream after the last block.
// layers[i] = {input_norm, q, k, v, bq, bk, bv, o, post_norm, gate, up, down}, where each
// projection is three tensors (see Linear) and the biases are empty where there are none;
// caches[i] = {keys, values}, each (B, K, max_len, D), filled from position `length`;
// key_mask (B, max_len) false at padding; cos and sin the rotary tables (positions, D).
// With a final `norm` weight (empty: none), the stream of every token, or of each row's last
// (`last_only`), is normed, and with `head`'s three tensors (empty: none) turned into logits.
// A decoding step is then one call from Python: each operator dispatched around it cost
// 5-20 us, the caches the blocks had just swept slowing the interpreter down threefold.
torch::Tensor decode_step(torch::Tensor x, torch::Tensor ids, std::vector<torch::Tensor> embedding,
                          std::vector<std::vector<torch::Tensor>> layers,
                          std::vector<std::vector<torch::Tensor>> caches, torch::Tensor key_mask,
                          torch::Tensor cos, torch::Tensor sin, int64_t length, double eps,
                          int64_t n_heads, int64_t n_kv_heads, int64_t tokens, torch::Tensor row_tokens,
                          torch::Tensor norm, std::vector<torch::Tensor> head, bool last_only) {
  if (ids.numel()) {  // token ids, looked up in the embedding's rows
    TORCH_CHECK(ids.scalar_type() == torch::kInt64, "decode_step: int64 token ids expected");
    x = embed_rows(ids.contiguous(), embedding);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() >= 2, "decode_step: fp32 (..., d) embeddings expected");
    x = x.reshape({-1, x.size(-1)}).clone(at::MemoryFormat::Contiguous);
  }
  TORCH_CHECK(key_mask.scalar_type() == torch::kBool && key_mask.is_contiguous(), "decode_step: bool key_mask");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes(),
              "decode_step: contiguous fp32 (positions, D) rotary tables expected");
  const int64_t R = x.size(0), d = x.size(1), T = tokens, B = caches[0][0].size(0);
  // Row b's tokens are x's rows first[b] to first[b + 1] - 1; x-row r belongs to row of[r].
  std::vector<int64_t> first(B + 1), of(R);
  if (row_tokens.numel()) {
    TORCH_CHECK(row_tokens.scalar_type() == torch::kInt64 && row_tokens.numel() == B,
                "decode_step: row_tokens must hold an int64 count for each row of the cache");
    const torch::Tensor held = row_tokens.contiguous();
    const int64_t* counts = held.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(counts[b] >= 1 && counts[b] <= length + T, "decode_step: row ", b, " has ", counts[b],
                  " new tokens; between 1 and length + tokens (", length + T, ") fit");
      first[b + 1] = first[b] + counts[b];
    }
  } else {
    for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + T;
  }
  TORCH_CHECK(T >= 1 && first[B] == R, "decode_step: x must hold each row's new tokens (", first[B], " rows), got ", R);
  for (int64_t b = 0; b < B; ++b) std::fill(of.begin() + first[b], of.begin() + first[b + 1], b);
  const int64_t D = cos.size(1), H = n_heads, K = n_kv_heads, group = H / K;
  const int64_t q_size = H * D, kv_size = K * D;
  const int64_t ff = layers[0][17].size(0), max_len = caches[0][0].size(2);
  TORCH_CHECK(length + T <= max_len, "decode_step: the cache is full");
  const float scale = 1.0f / std::sqrt(float(D));
  std::vector<float> h(R * d), q(R * q_size), k(R * kv_size), v(R * kv_size), o(R * q_size);
  std::vector<float> gate(R * ff), up(R * ff), out(R * d);
  std::vector<float> rope_scratch(R * D);  // a row's own, so that rows on other threads never share it
  const bool* mask = key_mask.data_ptr<bool>();
  // A token's position counts its row's real tokens before it (padding does not count), as
  // DecoderLM.forward numbers a left-padded prompt from 0.
  std::vector<const float*> cos_at(R), sin_at(R);
  std::vector<int64_t> first_key(B);  // each row's first real key, for `attend`
  std::vector<int64_t> place(R);      // each new token's position in the cache
  for (int64_t b = 0; b < B; ++b) {
    const bool* row_mask = mask + b * max_len;
    first_key[b] = std::find(row_mask, row_mask + length + T, true) - row_mask;
    const int64_t start = length + T - (first[b + 1] - first[b]);
    int64_t real = std::count(row_mask, row_mask + start, true);
    for (int64_t r = first[b]; r < first[b + 1]; ++r) {
      place[r] = start + r - first[b];
      real += row_mask[place[r]];
      const int64_t position = std::max<int64_t>(real - 1, 0);
      TORCH_CHECK(position < cos.size(0), "decode_step: position ", position, " is beyond the rotary tables (",
                  cos.size(0), ")");
      cos_at[r] = cos.data_ptr<float>() + position * D;
      sin_at[r] = sin.data_ptr<float>() + position * D;
    }
  }
  float* xp = x.data_ptr<float>();
  for (size_t li = 0; li < layers.size(); ++li) {
    auto& L = layers[li];
    TORCH_CHECK(L.size() == 26, "decode_step: 26 tensors per layer expected, got ", L.size());
    for (size_t i : {0, 10, 11, 12, 16})
      TORCH_CHECK(!L[i].numel() || (L[i].scalar_type() == torch::kFloat32 && L[i].is_contiguous()),
                  "decode_step: contiguous fp32 norms and biases expected");
    const float* input_norm = L[0].data_ptr<float>();
    for_rows(R, 8 * d, [&](int64_t r) { rms_norm(xp + r * d, input_norm, h.data() + r * d, d, float(eps)); });
    project(h.data(), R, d, {as_linear(L, 1, d), as_linear(L, 4, d), as_linear(L, 7, d)},
            {opt(L[10]), opt(L[11]), opt(L[12])}, {q.data(), k.data(), v.data()});
    float* kc = caches[li][0].data_ptr<float>();
    float* vc = caches[li][1].data_ptr<float>();
    for_rows(R, 8 * (q_size + kv_size), [&](int64_t r) {
      float* tmp = rope_scratch.data() + r * D;
      const int64_t b = of[r], position = place[r];
      for (int64_t hh = 0; hh < H; ++hh) rope(q.data() + r * q_size + hh * D, cos_at[r], sin_at[r], D, tmp);
      for (int64_t g = 0; g < K; ++g) {
        rope(k.data() + r * kv_size + g * D, cos_at[r], sin_at[r], D, tmp);
        const int64_t at = ((b * K + g) * max_len + position) * D;
        std::copy(k.data() + r * kv_size + g * D, k.data() + r * kv_size + (g + 1) * D, kc + at);
        std::copy(v.data() + r * kv_size + g * D, v.data() + r * kv_size + (g + 1) * D, vc + at);
      }
    });
    // Attention of each (token, head) to the cached positions up to its own that are not
    // padding; a token always sees itself, as the blocks' mask lets a padding query do.
    const int64_t S_max = length + T;
    at::parallel_for(0, R * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(S_max * D, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> p(S_max + 16);  // room for a vector loop's last 16
      for (int64_t rh = begin; rh < end; ++rh) {
        const int64_t r = rh / H, hh = rh % H, g = hh / group, b = of[r], self = place[r];
        const float* qv = q.data() + r * q_size + hh * D;
        const float* kb = kc + (b * K + g) * max_len * D;
        const float* vb = vc + (b * K + g) * max_len * D;
        attend(kb, vb, qv, mask + b * max_len, std::min(first_key[b], self), self, D, scale, p.data(),
               o.data() + r * q_size + hh * D);
      }
    });
    project(o.data(), R, q_size, {as_linear(L, 13, q_size)}, {nullptr}, {out.data()});
    const float* post_norm = L[16].data_ptr<float>();
    for_rows(R, 8 * d, [&](int64_t r) {
      for (int64_t i = r * d; i < (r + 1) * d; ++i) xp[i] += out[i];
      rms_norm(xp + r * d, post_norm, h.data() + r * d, d, float(eps));
    });
    project(h.data(), R, d, {as_linear(L, 17, d), as_linear(L, 20, d)}, {nullptr, nullptr},
            {gate.data(), up.data()});
    for_rows(R, 16 * ff, [&](int64_t r) {  // an exp is worth a dozen floats of a product
      for (int64_t i = r * ff; i < (r + 1) * ff; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    });
    project(gate.data(), R, ff, {as_linear(L, 23, ff)}, {nullptr}, {out.data()});
    for_rows(R, 2 * d, [&](int64_t r) {
      for (int64_t i = r * d; i < (r + 1) * d; ++i) xp[i] += out[i];
    });
  }
  if (!norm.numel()) return x;
  TORCH_CHECK(norm.scalar_type() == torch::kFloat32 && norm.is_contiguous() && norm.numel() == d,
              "decode_step: a contiguous fp32 final norm of ", d, " weights expected");
  const int64_t N = last_only ? B : R;
  auto normed = torch::empty({N, d}, x.options());
  float* np = normed.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i)
    rms_norm(xp + (last_only ? first[i + 1] - 1 : i) * d, norm.data_ptr<float>(), np + i * d, d, float(eps));
  if (head.empty()) return normed;
  TORCH_CHECK(head.size() == 3, "decode_step: the head is three tensors (see Linear), got ", head.size());
  const Linear h_linear = as_linear(head, 0, d);
  auto logits = torch::empty({N, h_linear.rows}, x.options());
  project(np, N, d, {h_linear}, {nullptr}, {logits.data_ptr<float>()});
  return logits;
}

// The argmax of n numbers, the first of equal maxima, as torch.argmax (a NaN wins, as there).
static int64_t first_argmax(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n && !std::isnan(v[best]); ++i)
    if (v[i] > v[best] || std::isnan(v[i])) best = i;
  return best;
}

// A token drawn from softmax(logits / temperature), written to `probs`, by the exponential race
// that `slmlab.infer.generate.draw` runs: the argmax of probs / race, with `race` holding an
// Exp(1) draw for every token (a token wins with its probability, as in the Gumbel-max trick).
static int64_t draw_token(const float* logits, const float* race, float* probs, int64_t n, double temperature) {
  const float t = float(temperature);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) top = std::max(top, probs[i] = logits[i] / t);
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += probs[i] = std::exp(probs[i] - top);
  const float scale = 1.f / total;
  int64_t best = 0;
  float best_ratio = -1.f;
  for (int64_t i = 0; i < n; ++i) {
    const float ratio = (probs[i] *= scale) / race[i];
    if (ratio > best_ratio) best_ratio = ratio, best = i;
  }
  return best;
}

// A few decoding steps of every row in one call: decode_step on `ids` (B * T), then on each
// row's last choice, `steps` times in all. Returns (B, T + steps - 1): the choice after each of
// the T tokens fed, then after each choice fed back; the cache takes in all but the last choice.
// A choice is the argmax of the logits (the first of equal maxima, as torch.argmax), except,
// where `races` (B, steps, vocab) is given, the choice after each row's last token of a step:
// drawn from softmax(logits / temperature) by `draw_token`, that distribution written to
// `probs` (B, steps, vocab). With `min_confidence` above 0 the steps end early, after a step
// where every row's choice had a probability (softmax of the logits) below it; fewer columns
// come back then. A speculative drafter makes a few tokens this way, and a greedy check reads
// the model's choice after each draft token: each step a call from Python cost as much again
// in the interpreter as in the blocks.
torch::Tensor decode_tokens(torch::Tensor ids, std::vector<torch::Tensor> embedding,
                            std::vector<std::vector<torch::Tensor>> layers,
                            std::vector<std::vector<torch::Tensor>> caches, torch::Tensor key_mask, torch::Tensor cos,
                            torch::Tensor sin, int64_t length, double eps, int64_t n_heads, int64_t n_kv_heads,
                            int64_t tokens, torch::Tensor norm, std::vector<torch::Tensor> head, int64_t steps,
                            double min_confidence, double temperature, torch::Tensor races, torch::Tensor probs) {
  TORCH_CHECK(steps >= 1 && tokens >= 1 && ids.numel() % tokens == 0, "decode_tokens: steps >= 1 expected");
  TORCH_CHECK(norm.numel() && head.size() == 3, "decode_tokens: the final norm and the head are needed");
  const int64_t B = ids.numel() / tokens, width = tokens + steps - 1;
  const bool sampled = races.numel() > 0;
  if (sampled) {
    TORCH_CHECK(temperature > 0, "decode_tokens: a draw needs a temperature above 0");
    TORCH_CHECK(races.scalar_type() == torch::kFloat32 && races.is_contiguous() && races.dim() == 3 &&
                    races.size(0) == B && races.size(1) == steps,
                "decode_tokens: races (rows, steps, vocab) of fp32 expected");
    TORCH_CHECK(probs.scalar_type() == torch::kFloat32 && probs.is_contiguous() && probs.sizes() == races.sizes(),
                "decode_tokens: probs shaped as races expected");
  }
  auto chosen = torch::empty({B, width}, torch::kInt64);
  int64_t* cp = chosen.data_ptr<int64_t>();
  auto next = torch::empty({B}, torch::kInt64);
  const auto none = torch::empty({0});
  for (int64_t s = 0, column = 0; s < steps; ++s) {
    const auto logits = decode_step(none, ids, embedding, layers, caches, key_mask, cos, sin, length, eps, n_heads,
                                    n_kv_heads, tokens, none, norm, head, false);
    length += tokens;
    const int64_t V = logits.size(1);
    TORCH_CHECK(!sampled || races.size(2) == V, "decode_tokens: races of ", V, " tokens a step expected");
    bool confident = false;
    for (int64_t r = 0; r < B * tokens; ++r) {
      const float* lp = logits.data_ptr<float>() + r * V;
      const int64_t b = r / tokens;
      const bool last = r % tokens == tokens - 1;
      const int64_t at = (b * steps + s) * V;  // this row's and step's race and distribution
      const int64_t choice = sampled && last
                                 ? draw_token(lp, races.data_ptr<float>() + at, probs.data_ptr<float>() + at, V,
                                              temperature)
                                 : first_argmax(lp, V);
      cp[b * width + column + r % tokens] = choice;
      next.data_ptr<int64_t>()[b] = choice;  // the row's last token's choice is fed next
      if (min_confidence > 0 && last) {
        double total = 0.0;  // the choice's probability is 1 / sum of exp(l_i - l_choice)
        for (int64_t i = 0; i < V; ++i) total += std::exp(double(lp[i]) - lp[choice]);
        confident |= 1.0 / total >= min_confidence;
      }
    }
    column += tokens;
    if (min_confidence > 0 && !confident) return chosen.narrow(1, 0, column);
    ids = next;
    tokens = 1;
  }
  return chosen;
}

// A tensor of at least `floats` fp32 numbers kept by the calling thread from call to call. A
// prefill's scratch allocated anew at every layer is fresh memory at every layer (glibc maps
// blocks of megabytes anew), and first touching its pages cost a 4-bit SmolLM2-135M's 128-token
// prompt about 59,000 page faults and a third of its time on a virtual machine.
static torch::Tensor reused_scratch(std::vector<torch::Tensor>& kept, size_t slot, int64_t floats) {
  if (kept.size() <= slot) kept.resize(slot + 1);
  if (!kept[slot].defined() || kept[slot].numel() < floats) kept[slot] = torch::empty({floats}, torch::kFloat32);
  return kept[slot];
}

// y = x W^T for many rows of x (prefill, scoring: compute-bound), with W kept packed:
// `unpack(begin, end, out)` writes W's rows begin..end-1 in fp32 to `out`, a tile of rows at a
// time, and PyTorch's GEMM multiplies each tile into y^T's rows (contiguous), then y^T is
// copied into y. The tile and a y^T of up to 4 MB are the thread's reused scratch.
template <typename Unpack>
static torch::Tensor unpacked_gemm(const torch::Tensor& x, int64_t n, const Unpack& unpack) {
  constexpr int64_t kept_floats = 1 << 20;  // 4 MB
  thread_local std::vector<torch::Tensor> kept;
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t tile = std::min(n, std::max<int64_t>(1, kept_floats / k));
  auto buffer = reused_scratch(kept, 0, tile * k).narrow(0, 0, tile * k).view({tile, k});
  auto yt = n * m <= kept_floats ? reused_scratch(kept, 1, n * m).narrow(0, 0, n * m).view({n, m})
                                 : torch::empty({n, m}, x.options());
  auto xt = x.t();
  float* bp = buffer.data_ptr<float>();
  for (int64_t r0 = 0; r0 < n; r0 += tile) {
    const int64_t r1 = std::min(n, r0 + tile);
    at::parallel_for(r0, r1, 16, [&](int64_t begin, int64_t end) { unpack(begin, end, bp + (begin - r0) * k); });
    auto out = yt.narrow(0, r0, r1 - r0);
    at::mm_out(out, buffer.narrow(0, 0, r1 - r0), xt);
  }
  return yt.t().clone(at::MemoryFormat::Contiguous);  // a copy always: yt may be the scratch
}

// x: (m, k) fp32; packed: (n, k/2) uint8; scales: (n, k/group) fp32; zeros: (n, k/group) uint8,
// or empty for symmetric codes (zero point 8). `max_rows_int8`: up to this many rows of x take
// the int8-activation path, more take dequantize-and-GEMM. `vector`: false forces the portable
// loop (the tests compare the two).
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor zeros,
                          int64_t group, int64_t max_rows_int8, bool vector) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "int4_linear: fp32 (m, k) input expected");
  const int64_t m = x.size(0), k = x.size(1);
  check_int4(packed, scales, zeros, k, group, "int4_linear");
  const int64_t n = packed.size(0);
  x = x.contiguous();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const uint8_t* zp = zeros.numel() ? zeros.data_ptr<uint8_t>() : nullptr;
  if (m > max_rows_int8) {
    return unpacked_gemm(x, n, [&](int64_t begin, int64_t end, float* out) {
      dequantize_rows(wp, sp, zp, k, group, begin, end, out);
    });
  }
  const QuantizedX qx(x.data_ptr<float>(), m, k);
  const std::vector<float> group_sums = qx.group_sums(group);
  auto y = torch::empty({m, n}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, grain_rows(k), [&](int64_t begin, int64_t end) {  // as `project` sizes it
    int4_output_rows(wp, sp, zp, k, group, begin, end, n, qx, group_sums.data(), nullptr, vector, yp);
  });
  return y;
}

// x: (m, k) fp32; values: (n, k/2) fp32; positions: (n, k/8) uint8 (section 3). Up to
// `max_rows` rows of x take the packed product; more (prefill, scoring) are compute-bound, and
// unpack a tile of rows at a time for PyTorch's GEMM. `vector`: false forces the portable loop
// (the tests compare the two).
torch::Tensor sparse24_linear(torch::Tensor x, torch::Tensor values, torch::Tensor positions, int64_t max_rows,
                              bool vector) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "sparse24_linear: fp32 (m, k) input expected");
  const int64_t m = x.size(0), k = x.size(1), n = values.size(0);
  check_sparse24(values, positions, k, "sparse24_linear");
  x = x.contiguous();
  const float* vp = values.data_ptr<float>();
  const uint8_t* ip = positions.data_ptr<uint8_t>();
  if (m > max_rows) {
    return unpacked_gemm(x, n, [&](int64_t begin, int64_t end, float* out) {
      unpack_sparse24_rows(vp, ip, k, begin, end, out);
    });
  }
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, grain_rows(k / 2), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) sparse24_outputs(vp, ip, k, r, n, xp, m, nullptr, vector, yp);
  });
  return y;
}

// The kernels touch tensors only: other Python threads (a server's event loop) run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("gemv", &gemv, "y = x W^T for few rows of x", release());
  m.def("gemv_many", &gemv_many, "[x W_i^T for each W_i], in one parallel region", release());
  m.def("decode_step", &decode_step, "all decoder blocks for a few new tokens per row", release());
  m.def("decode_tokens", &decode_tokens, "a few decoding steps of every row, greedy or drawn", release());
  m.def("int4_linear", &int4_linear, "y = x W^T, W as packed int4 codes with group scales and zeros",
        release());
  m.def("sparse24_linear", &sparse24_linear,
        "y = x W^T, W 2:4-sparse as kept values and 2-bit positions", release());
  m.def("set_min_floats_per_thread", &set_min_floats_per_thread, "parallel grain, in weights");
}

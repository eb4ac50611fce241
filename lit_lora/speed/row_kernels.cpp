// The decoding kernels of lit_lora/speed/row_kernels.py: a few activation rows times a weight matrix, for the
// one-token steps of decoding, where every weight is read once per token and the time is the bytes read.
// Both read each weight row once and multiply it into the rows of x, which stay in the L1 cache.
//
// int8_rows (lit_lora/speed/int8.py), weights stored as int8 with one float scale per output row:
//
//     out[n, o] = scale[o] * sum_i x[n, i] * q[o, i]        x (N, K), q (O, K) int8, scale (O,)
//
// Replaces `x @ (q * scale[:, None]).T` (dequantize, then multiply), which writes and reads a float copy
// of the weights at every token. The rows of x are first rounded to int16 with a scale per row, so the
// products are integer ones: one AVX2 instruction (madd) multiplies 16 int8-int16 pairs and adds them
// in pairs, half the instructions of widening every weight to float32, which is what lets two cores
// read the weights as fast as the memory delivers them.
//
// bf16_rows (lit_lora/speed/decoding.py, compiled decoding in bf16):
//
//     out[n, o] = sum_i x[n, i] * w[o, i]                   x (N, K), w (O, K), both bf16
//
// Replaces the elementwise product and sum that inductor compiles for `F.linear` of one row, and the
// matrix product for 2 to 16 rows (a batch of prompts), which reads W at a fraction of the memory's
// speed. Inductor's loop widens every weight to float32 before multiplying (about 4 instructions per
// 16 weights); one AVX512-BF16 instruction (dpbf16) multiplies 32 bf16 pairs and adds them into
// float32 lanes.
//
// lit_lora/speed/row_kernels.py compiles this file on first use (torch.utils.cpp_extension), with -mavx2
// where PyTorch runs its AVX2 or AVX512 code (ATEN_CPU_CAPABILITY can lower that) and -mavx512bf16
// where the CPU also has AVX512-BF16; elsewhere the plain loops below do the same arithmetic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// Integer products of int8 weights and int16 activations add up in 32-bit lanes; converting the lanes to
// float32 every kSpan weights keeps them below 2^31: a lane gains at most 2 * 127 * 32767 ~ 2^23 per
// 32 weights, so 64 of those steps (2048 weights) stay below 2^29, and the two accumulators below 2^30.
constexpr int64_t kBlock = 32;   // weights per loop step in both kernels; K must be a multiple
constexpr int64_t kSpan = 2048;  // weights between conversions to float32

#if defined(__AVX2__)
// 16 int8 weights -> 16 int16 lanes
inline __m256i widen(const int8_t* q) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))); }

inline __m256i load(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }

// sum_i x[i] q[i], exactly in integers within a span
float int8_dot(const int16_t* x, const int8_t* q, int64_t K) {
  __m256 total = _mm256_setzero_ps();
  for (int64_t start = 0; start < K; start += kSpan) {
    const int64_t end = std::min(start + kSpan, K);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    for (int64_t i = start; i < end; i += kBlock) {  // madd: 16 products, summed in pairs into 8 int32 lanes
      acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(widen(q + i), load(x + i)));
      acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(widen(q + i + 16), load(x + i + 16)));
    }
    total = _mm256_add_ps(total, _mm256_cvtepi32_ps(_mm256_add_epi32(acc0, acc1)));
  }
  __m128 four = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));  // 8 lanes -> 1
  __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
#else
float int8_dot(const int16_t* x, const int8_t* q, int64_t K) {
  int64_t sum = 0;
  for (int64_t i = 0; i < K; ++i) sum += static_cast<int32_t>(x[i]) * q[i];
  return static_cast<float>(sum);
}
#endif

// T is float or c10::BFloat16, the dtype of x, scale and the result. Each row of x is stored as int16
// with its own scale, x[n, i] ~ x_scale[n] * x16[n, i]: an error of at most x_scale / 2 = max|x[n]| / 65534
// per value, 258 times below the weights' int8 rounding (max|W[o]| / 254) and below bf16's own rounding.
template <typename T>
void rows_times_int8(const T* x, const int8_t* q, const T* scale, T* out, int64_t N, int64_t O, int64_t K) {
  std::vector<int16_t> x16(N * K);
  std::vector<float> x_scale(N);
  for (int64_t n = 0; n < N; ++n) {
    float largest = 0.f;
    for (int64_t i = 0; i < K; ++i) largest = std::max(largest, std::abs(static_cast<float>(x[n * K + i])));
    x_scale[n] = largest / 32767.f;
    const float inverse = largest > 0.f ? 32767.f / largest : 0.f;
    for (int64_t i = 0; i < K; ++i) x16[n * K + i] = static_cast<int16_t>(std::nearbyint(static_cast<float>(x[n * K + i]) * inverse));
  }
  at::parallel_for(0, O, 64, [&](int64_t begin, int64_t end) {  // threads split the output rows
    for (int64_t o = begin; o < end; ++o)
      for (int64_t n = 0; n < N; ++n)
        out[n * O + o] = static_cast<T>(static_cast<float>(scale[o]) * x_scale[n] * int8_dot(x16.data() + n * K, q + o * K, K));
  });
}

at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1, "int8_rows: x (N, K), q (O, K), scale (O,)");
  TORCH_CHECK(q.scalar_type() == at::kChar, "int8_rows: q must be int8");
  TORCH_CHECK(x.scalar_type() == scale.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int8_rows: x and scale must both be float32 or both bfloat16");
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0), "int8_rows: shapes do not match");
  TORCH_CHECK(q.size(1) % kBlock == 0, "int8_rows: K must be a multiple of ", kBlock);
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous();  // no copies when they are
  at::Tensor out = at::empty({x.size(0), q.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    rows_times_int8(xc.data_ptr<float>(), qc.data_ptr<int8_t>(), sc.data_ptr<float>(), out.data_ptr<float>(),
                    x.size(0), q.size(0), x.size(1));
  } else {
    rows_times_int8(xc.data_ptr<at::BFloat16>(), qc.data_ptr<int8_t>(), sc.data_ptr<at::BFloat16>(),
                    out.data_ptr<at::BFloat16>(), x.size(0), q.size(0), x.size(1));
  }
  return out;
}

#if defined(__AVX512BF16__)
inline __m512bh load_pairs(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }  // 32 bf16

// sum_i x[i] w[i] in float32: each dpbf16 adds 32 exact bf16 products into 16 float32 lanes
float bf16_dot(const at::BFloat16* x, const at::BFloat16* w, int64_t K) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kBlock <= K; i += 2 * kBlock) {
    acc0 = _mm512_dpbf16_ps(acc0, load_pairs(w + i), load_pairs(x + i));
    acc1 = _mm512_dpbf16_ps(acc1, load_pairs(w + i + kBlock), load_pairs(x + i + kBlock));
  }
  if (i < K) acc0 = _mm512_dpbf16_ps(acc0, load_pairs(w + i), load_pairs(x + i));  // K an odd multiple of 32
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#else
float bf16_dot(const at::BFloat16* x, const at::BFloat16* w, int64_t K) {
  float sum = 0.f;
  for (int64_t i = 0; i < K; ++i) sum += static_cast<float>(x[i]) * static_cast<float>(w[i]);
  return sum;
}
#endif

at::Tensor bf16_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "bf16_rows: x (N, K), w (O, K)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_rows: x and w must be bfloat16");
  TORCH_CHECK(x.size(1) == w.size(1), "bf16_rows: shapes do not match");
  TORCH_CHECK(w.size(1) % kBlock == 0, "bf16_rows: K must be a multiple of ", kBlock);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();  // no copies when they are
  const int64_t N = x.size(0), O = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N, O}, x.options());
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = wc.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, O, 64, [&](int64_t begin, int64_t end) {  // threads split the output rows
    for (int64_t o = begin; o < end; ++o)
      for (int64_t n = 0; n < N; ++n) op[n * O + o] = static_cast<at::BFloat16>(bf16_dot(xp + n * K, wp + o * K, K));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lit_lora, m) {
  m.def("int8_rows(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("bf16_rows(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(lit_lora, CPU, m) {
  m.impl("int8_rows", &int8_rows);
  m.impl("bf16_rows", &bf16_rows);
}

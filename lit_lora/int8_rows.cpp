// The int8 decoding kernel of lit_lora/int8.py: a few activation rows times a weight matrix stored as
// int8 with one float scale per output row.
//
//     out[n, o] = scale[o] * sum_i x[n, i] * q[o, i]        x (N, K), q (O, K) int8, scale (O,)
//
// Replaces `x @ (q * scale[:, None]).T` (dequantize, then multiply), which writes and reads a float copy
// of the weights at every token. Why it is faster: decoding reads every weight once per token, so the
// time is the bytes read; here each weight row is read once, 1 byte per weight, and multiplied into
// the rows of x, which stay in the L1 cache. The rows of x are first rounded to int16 with a scale per
// row, so the products are integer ones: one AVX2 instruction (madd) multiplies 16 int8-int16 pairs
// and adds them in pairs, half the instructions of widening every weight to float32, which is what
// lets two cores read the weights as fast as the memory delivers them.
// lit_lora/int8.py compiles this file on first use (torch.utils.cpp_extension), with -mavx2
// only on a CPU that has them; elsewhere the plain loop below does the same integer arithmetic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Integer products of int8 weights and int16 activations add up in 32-bit lanes; converting the lanes to
// float32 every kSpan weights keeps them below 2^31: a lane gains at most 2 * 127 * 32767 ~ 2^23 per
// 32 weights, so 64 of those steps (2048 weights) stay below 2^29, and the two accumulators below 2^30.
constexpr int64_t kBlock = 32;   // weights per loop step; K must be a multiple
constexpr int64_t kSpan = 2048;  // weights between conversions to float32

#if defined(__AVX2__)
// 16 int8 weights -> 16 int16 lanes
inline __m256i widen(const int8_t* q) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))); }

inline __m256i load(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }

// sum_i x[i] q[i], exactly in integers within a span
float dot(const int16_t* x, const int8_t* q, int64_t K) {
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
float dot(const int16_t* x, const int8_t* q, int64_t K) {
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
        out[n * O + o] = static_cast<T>(static_cast<float>(scale[o]) * x_scale[n] * dot(x16.data() + n * K, q + o * K, K));
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

}  // namespace

TORCH_LIBRARY(lit_lora, m) { m.def("int8_rows(Tensor x, Tensor q, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(lit_lora, CPU, m) { m.impl("int8_rows", &int8_rows); }

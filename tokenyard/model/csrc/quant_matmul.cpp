// Linear layers over block-quantized weights, as GGUF stores them, without expanding them to fp32 in memory.
//
// Formats (one row of a weight matrix [N, K] is K/32 blocks of 32 weights):
//   q4_1: q uint8 [N, K/2]: each block's 16 bytes hold weight j in the low nibble of byte j and weight j+16 in
//         the high nibble (GGUF's order); scales and mins fp32 [N, K/32]; weight = scale * nibble + min.
//   q8_0: q int8 [N, K]; scales fp32 [N, K/32]; weight = scale * q.
//
// A decode step multiplies a few rows of activations by every weight once, so it is bound by reading weights:
// 4.5 bits a weight instead of 32 is the whole point. For up to kDirectRows rows the kernel dequantizes each
// block in registers (AVX-512 or AVX2, chosen at run time; a scalar loop otherwise) and uses it for every row.
// For more rows (prefill) the work is compute-bound: each thread dequantizes a slab of weight rows into an
// L2-sized fp32 buffer and multiplies it with ATen's GEMM.
//
// Arithmetic: per block, scale * sum(q * x) + min * sum(x), in fp32 — the same value as dequantizing to fp32 and
// taking the dot product, up to the order of the additions.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kDirectRows = 16;   // up to this many activation rows: dequantize in registers
constexpr int64_t kRowGroup = 4;      // activation rows sharing one dequantized block

enum class Kind { Q4_1, Q8_0 };

struct Weights {
  Kind kind;
  const uint8_t* q;
  const float* scales;
  const float* mins;   // q4_1 only
  int64_t n, k, nb;    // rows, columns, blocks per row
  int64_t row_bytes;
};

// ------------------------------------------------------------------------------------------ scalar reference
void dequant_row_scalar(const Weights& w, int64_t row, float* out) {
  const uint8_t* q = w.q + row * w.row_bytes;
  for (int64_t b = 0; b < w.nb; ++b) {
    const float d = w.scales[row * w.nb + b];
    if (w.kind == Kind::Q4_1) {
      const float m = w.mins[row * w.nb + b];
      const uint8_t* qb = q + b * 16;
      for (int j = 0; j < 16; ++j) {
        out[b * kBlock + j] = d * static_cast<float>(qb[j] & 0x0F) + m;
        out[b * kBlock + j + 16] = d * static_cast<float>(qb[j] >> 4) + m;
      }
    } else {
      const int8_t* qb = reinterpret_cast<const int8_t*>(q) + b * kBlock;
      for (int j = 0; j < kBlock; ++j) out[b * kBlock + j] = d * static_cast<float>(qb[j]);
    }
  }
}

void rows_scalar(const Weights& w, const float* x, const float* xsum, int64_t rows, int64_t n0, int64_t n1,
                 float* y, int64_t ldy) {
  std::vector<float> wrow(w.k);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row_scalar(w, n, wrow.data());
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (int64_t i = 0; i < w.k; ++i) acc += wrow[i] * x[r * w.k + i];
      y[r * ldy + n] = acc;
    }
  }
  (void)xsum;
}

// ------------------------------------------------------------------------------------------ AVX-512
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void block512(const Weights& w, const uint8_t* q, int64_t b, __m512& lo, __m512& hi) {
  if (w.kind == Kind::Q4_1) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, mask)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask)));
  } else {
    const int8_t* p = reinterpret_cast<const int8_t*>(q) + b * kBlock;
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void rows_avx512(const Weights& w, const float* x, const float* xsum, int64_t rows, int64_t n0, int64_t n1,
                 float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
    const int64_t R = std::min(kRowGroup, rows - r0);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* q = w.q + n * w.row_bytes;
      const float* sc = w.scales + n * w.nb;
      __m512 acc[kRowGroup];
      for (int r = 0; r < kRowGroup; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t b = 0; b < w.nb; ++b) {
        __m512 lo, hi;
        block512(w, q, b, lo, hi);
        const __m512 d = _mm512_set1_ps(sc[b]);
        for (int64_t r = 0; r < R; ++r) {
          const float* xr = x + (r0 + r) * w.k + b * kBlock;
          __m512 t = _mm512_mul_ps(lo, _mm512_loadu_ps(xr));
          t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), t);
          acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(acc[r]);
        if (w.kind == Kind::Q4_1) {
          const float* mn = w.mins + n * w.nb;
          const float* xs = xsum + (r0 + r) * w.nb;
          for (int64_t b = 0; b < w.nb; ++b) s += mn[b] * xs[b];
        }
        y[(r0 + r) * ldy + n] = s;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ AVX2
__attribute__((target("avx2,fma")))
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma")))
void rows_avx2(const Weights& w, const float* x, const float* xsum, int64_t rows, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
    const int64_t R = std::min(kRowGroup, rows - r0);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* q = w.q + n * w.row_bytes;
      const float* sc = w.scales + n * w.nb;
      __m256 acc[kRowGroup];
      for (int r = 0; r < kRowGroup; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t b = 0; b < w.nb; ++b) {
        __m256 v[4];   // the block's 32 weights (as integers), 8 at a time
        if (w.kind == Kind::Q4_1) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
          const __m128i lo = _mm_and_si128(raw, mask);
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
          v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
          v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
          v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
          v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        } else {
          const int8_t* p = reinterpret_cast<const int8_t*>(q) + b * kBlock;
          for (int j = 0; j < 4; ++j)
            v[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j))));
        }
        const __m256 d = _mm256_set1_ps(sc[b]);
        for (int64_t r = 0; r < R; ++r) {
          const float* xr = x + (r0 + r) * w.k + b * kBlock;
          __m256 t = _mm256_mul_ps(v[0], _mm256_loadu_ps(xr));
          t = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xr + 8), t);
          t = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xr + 16), t);
          t = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xr + 24), t);
          acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        float s = hsum256(acc[r]);
        if (w.kind == Kind::Q4_1) {
          const float* mn = w.mins + n * w.nb;
          const float* xs = xsum + (r0 + r) * w.nb;
          for (int64_t b = 0; b < w.nb; ++b) s += mn[b] * xs[b];
        }
        y[(r0 + r) * ldy + n] = s;
      }
    }
  }
}

using RowsFn = void (*)(const Weights&, const float*, const float*, int64_t, int64_t, int64_t, float*, int64_t);

RowsFn pick_rows_fn() {
  static const RowsFn fn = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return &rows_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &rows_avx2;
    return &rows_scalar;
  }();
  return fn;
}

Weights describe(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& mins) {
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous() && scales.dtype() == torch::kFloat32,
              "quantized weight: contiguous q and fp32 scales expected");
  Weights w;
  w.n = q.size(0);
  w.nb = scales.size(1);
  w.k = w.nb * kBlock;
  TORCH_CHECK(scales.size(0) == w.n, "quantized weight: scales rows must match");
  if (q.dtype() == torch::kUInt8) {
    w.kind = Kind::Q4_1;
    TORCH_CHECK(q.size(1) * 2 == w.k && mins.defined() && mins.numel() == scales.numel() &&
                mins.is_contiguous() && mins.dtype() == torch::kFloat32, "q4_1: [N, K/2] nibbles, fp32 mins");
    w.mins = mins.data_ptr<float>();
  } else {
    TORCH_CHECK(q.dtype() == torch::kInt8 && q.size(1) == w.k, "q8_0: int8 [N, K] expected");
    w.kind = Kind::Q8_0;
    w.mins = nullptr;
  }
  w.q = static_cast<const uint8_t*>(q.data_ptr());
  w.scales = scales.data_ptr<float>();
  w.row_bytes = q.size(1);
  return w;
}

}  // namespace

// The fp32 weight matrix [N, K] of a quantized one (tests, embeddings, fp32 fallback).
torch::Tensor quant_dequantize(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& mins) {
  const Weights w = describe(q, scales, mins);
  auto out = torch::empty({w.n, w.k}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, w.n, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequant_row_scalar(w, n, o + n * w.k);
  });
  return out;
}

// x [T, K] fp32 times the quantized weight's transpose: [T, N] (F.linear's contract), plus an optional bias.
torch::Tensor quant_linear(const torch::Tensor& x_in, const torch::Tensor& q, const torch::Tensor& scales,
                           const torch::Tensor& mins, const c10::optional<torch::Tensor>& bias) {
  const Weights w = describe(q, scales, mins);
  TORCH_CHECK(x_in.dtype() == torch::kFloat32 && x_in.size(-1) == w.k, "quant_linear: fp32 x with K columns");
  const auto x = x_in.reshape({-1, w.k}).contiguous();
  const int64_t T = x.size(0);
  auto y = torch::empty({T, w.n}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (T <= kDirectRows) {
    std::vector<float> xsum(T * w.nb, 0.f);   // per block sums of x: the min term of q4_1
    if (w.kind == Kind::Q4_1)
      for (int64_t r = 0; r < T; ++r)
        for (int64_t b = 0; b < w.nb; ++b) {
          float s = 0.f;
          for (int64_t j = 0; j < kBlock; ++j) s += xp[r * w.k + b * kBlock + j];
          xsum[r * w.nb + b] = s;
        }
    const RowsFn fn = pick_rows_fn();
    at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) { fn(w, xp, xsum.data(), T, n0, n1, yp, w.n); });
  } else {
    // Each thread: a slab of weight rows dequantized into its own buffer, then one GEMM for the slab.
    const int64_t slab = std::max<int64_t>(16, (256 * 1024 / 4) / w.k);   // ~256 KB of fp32 weights
    const bool inference = c10::InferenceMode::is_enabled();
    at::parallel_for(0, (w.n + slab - 1) / slab, 1, [&](int64_t s0, int64_t s1) {
      c10::InferenceMode guard(inference);   // worker threads do not inherit the caller's mode
      auto buf = torch::empty({slab, w.k}, torch::kFloat32);
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t n0 = s * slab, rows = std::min(slab, w.n - n0);
        float* bp = buf.data_ptr<float>();
        for (int64_t n = 0; n < rows; ++n) dequant_row_scalar(w, n0 + n, bp + n * w.k);
        y.narrow(1, n0, rows).copy_(at::mm(x, buf.narrow(0, 0, rows).t()));
      }
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  auto shape = x_in.sizes().vec();
  shape.back() = w.n;
  return y.view(shape);
}

std::string quant_isa() {
  const RowsFn fn = pick_rows_fn();
  return fn == &rows_avx512 ? "avx512" : fn == &rows_avx2 ? "avx2" : "scalar";
}

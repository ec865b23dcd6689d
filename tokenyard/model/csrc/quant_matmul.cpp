// Linear layers over block-quantized weights, as GGUF stores them, without expanding them to fp32 in memory.
//
// Formats (one row of a weight matrix [N, K] is K/32 blocks of 32 weights):
//   q4_1: q uint8 [N, K/2]: each block's 16 bytes hold weight j in the low nibble of byte j and weight j+16 in
//         the high nibble (GGUF's order); scales and mins fp32 [N, K/32]; weight = scale * nibble + min.
//   q8_0: q int8 [N, K]; scales fp32 [N, K/32]; weight = scale * q.
//
// A decode step multiplies a few rows of activations by every weight once, so it is bound by reading weights:
// 5 bits a weight (q4_1 with its scale and min) instead of 32 is the point. Each thread takes four weight rows
// at a time, dequantizes them once into an L1-resident fp32 buffer (AVX-512 or AVX2, chosen at run time; a
// scalar loop otherwise), and multiplies them with the activations in register tiles (4 x 4 with AVX-512,
// 2 x 4 with AVX2), activations in chunks of 256 rows that stay in L2. On the 2-core AMD EPYC this was written
// on, that beats ATen's fp32 GEMM at every batch size measured, 1 to 512 rows, even with the fp32 weights in cache.
//
// Arithmetic of those paths: weight = scale * q (+ min) in fp32, then fp32 dot products: dequantize-then-matmul,
// summed in another order. Unless the caller asks for fp32 activations, two faster paths replace them where the
// CPU has the instructions: with AVX-512 VNNI, one to three activation rows (a decode step of a few streams)
// run with int8 activations (see "AVX-512 VNNI" below); with AVX512-BF16, four rows and more (prefill chunks,
// batched decode) run with bf16 products and fp32 sums (see "AVX-512 BF16").
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <cstring>
#include <string>
#include <vector>

void tokenyard_parallel_for(int64_t begin, int64_t end, int64_t grain,
                            const std::function<void(int64_t, int64_t)>& fn);   // thread_pool.cpp

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kIntRows = 3;      // up to this many activation rows: int8 activations (VNNI or AVX2);
                                      // from 4 rows on, the 4 x 4 fp32 tiles were faster here
constexpr int64_t kRowChunk = 256;   // activation rows per pass over the weights (kept in L2)

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

void rows_scalar(const Weights& w, const float* x, int64_t rows, int64_t n0, int64_t n1,
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

// Four weight rows at a time: their blocks are dequantized once into an L1-resident fp32 buffer, then the
// activations take their dot products from there in 4 x 4 tiles (16 accumulators: each load feeds four FMAs).
// Block b of weight row n in fp32: scale * q (+ min), one rounding (fused).
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void scaled_block512(const Weights& w, int64_t n, int64_t b, __m512& lo, __m512& hi) {
  block512(w, w.q + n * w.row_bytes, b, lo, hi);
  const __m512 d = _mm512_set1_ps(w.scales[n * w.nb + b]);
  if (w.kind == Kind::Q4_1) {
    const __m512 m = _mm512_set1_ps(w.mins[n * w.nb + b]);
    lo = _mm512_fmadd_ps(lo, d, m);
    hi = _mm512_fmadd_ps(hi, d, m);
  } else {
    lo = _mm512_mul_ps(lo, d);
    hi = _mm512_mul_ps(hi, d);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void dequant_row512(const Weights& w, int64_t n, float* out) {
  for (int64_t b = 0; b < w.nb; ++b) {
    __m512 lo, hi;
    scaled_block512(w, n, b, lo, hi);
    _mm512_storeu_ps(out + b * kBlock, lo);
    _mm512_storeu_ps(out + b * kBlock + 16, hi);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void rows_avx512(const Weights& w, const float* x, int64_t rows, int64_t n0, int64_t n1,
                 float* y, int64_t ldy) {
  const int64_t K = w.k;
  std::vector<float> buf(4 * K);
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t NR = std::min<int64_t>(4, n1 - n);
    for (int64_t j = 0; j < NR; ++j) dequant_row512(w, n + j, buf.data() + j * K);
    const float* w0 = buf.data();
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    int64_t r = 0;
    if (NR == 4) {
      for (; r + 4 <= rows; r += 4) {
        const float* x0 = x + r * K;
        const float* x1 = x0 + K;
        const float* x2 = x1 + K;
        const float* x3 = x2 + K;
        __m512 a[4][4];
        for (auto& row : a)
          for (auto& v : row) v = _mm512_setzero_ps();
        for (int64_t i = 0; i < K; i += 16) {
          const __m512 wv[4] = {_mm512_loadu_ps(w0 + i), _mm512_loadu_ps(w1 + i), _mm512_loadu_ps(w2 + i),
                                _mm512_loadu_ps(w3 + i)};
          const __m512 xv[4] = {_mm512_loadu_ps(x0 + i), _mm512_loadu_ps(x1 + i), _mm512_loadu_ps(x2 + i),
                                _mm512_loadu_ps(x3 + i)};
          for (int rr = 0; rr < 4; ++rr)
            for (int jj = 0; jj < 4; ++jj) a[rr][jj] = _mm512_fmadd_ps(wv[jj], xv[rr], a[rr][jj]);
        }
        for (int rr = 0; rr < 4; ++rr)
          for (int jj = 0; jj < 4; ++jj) y[(r + rr) * ldy + n + jj] = _mm512_reduce_add_ps(a[rr][jj]);
      }
    }
    for (; r < rows; ++r) {   // leftover activation rows (and every row when fewer than 4 weight rows are left)
      const float* xr = x + r * K;
      for (int64_t j = 0; j < NR; ++j) {
        const float* wr = buf.data() + j * K;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < K; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i), _mm512_loadu_ps(xr + i), acc);
        y[r * ldy + n + j] = _mm512_reduce_add_ps(acc);
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
inline void dequant_row256(const Weights& w, int64_t n, float* out) {
  const uint8_t* q = w.q + n * w.row_bytes;
  const float* sc = w.scales + n * w.nb;
  const __m128i mask = _mm_set1_epi8(0x0F);
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
    const __m256 m = w.kind == Kind::Q4_1 ? _mm256_set1_ps(w.mins[n * w.nb + b]) : _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + b * kBlock + 8 * j, _mm256_fmadd_ps(v[j], d, m));
  }
}

// As the AVX-512 path, with 2 weight rows x 4 activation rows per tile (AVX2 has 16 vector registers).
__attribute__((target("avx2,fma")))
void rows_avx2(const Weights& w, const float* x, int64_t rows, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  const int64_t K = w.k;
  std::vector<float> buf(2 * K);
  for (int64_t n = n0; n < n1; n += 2) {
    const int64_t NR = std::min<int64_t>(2, n1 - n);
    for (int64_t j = 0; j < NR; ++j) dequant_row256(w, n + j, buf.data() + j * K);
    const float* w0 = buf.data();
    const float* w1 = w0 + K;
    int64_t r = 0;
    if (NR == 2) {
      for (; r + 4 <= rows; r += 4) {
        const float* xs[4] = {x + r * K, x + (r + 1) * K, x + (r + 2) * K, x + (r + 3) * K};
        __m256 a[4][2];
        for (auto& row : a) row[0] = row[1] = _mm256_setzero_ps();
        for (int64_t i = 0; i < K; i += 8) {
          const __m256 wa = _mm256_loadu_ps(w0 + i), wb = _mm256_loadu_ps(w1 + i);
          for (int rr = 0; rr < 4; ++rr) {
            const __m256 xv = _mm256_loadu_ps(xs[rr] + i);
            a[rr][0] = _mm256_fmadd_ps(wa, xv, a[rr][0]);
            a[rr][1] = _mm256_fmadd_ps(wb, xv, a[rr][1]);
          }
        }
        for (int rr = 0; rr < 4; ++rr) {
          y[(r + rr) * ldy + n] = hsum256(a[rr][0]);
          y[(r + rr) * ldy + n + 1] = hsum256(a[rr][1]);
        }
      }
    }
    for (; r < rows; ++r) {
      const float* xr = x + r * K;
      for (int64_t j = 0; j < NR; ++j) {
        const float* wr = buf.data() + j * K;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < K; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(xr + i), acc);
        y[r * ldy + n + j] = hsum256(acc);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ AVX-512 VNNI
// For a few activation rows (a decode step), reading and expanding the weights is the work, so this path
// does it the way llama.cpp does: each activation row is quantized to int8 per block of 32 (scale max|x|/127),
// and 64 weights at a time meet 64 activations in one vpdpbusd (unsigned 8-bit weights x signed 8-bit
// activations, summed in int32). q4_1's nibbles are unsigned already; q8_0's weights are offset by 128 and
// 128 * sum(xq) is taken back. Per block: d_w * d_x * dot + (min_w * d_x * sum(xq) for q4_1).
struct QuantRows {
  std::vector<int8_t> q;     // [rows, K]
  std::vector<float> d;      // [rows, nb]: the activation block's scale
  std::vector<int32_t> sum;  // [rows, nb]: sum of its int8 values
};

void quantize_rows(const float* x, int64_t rows, int64_t k, QuantRows& out) {
  const int64_t nb = k / kBlock;
  out.q.resize(rows * k);
  out.d.resize(rows * nb);
  out.sum.resize(rows * nb);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * k + b * kBlock;
      float amax = 0.f;
      for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int j = 0; j < kBlock; ++j) {
        const int v = static_cast<int>(std::nearbyint(xb[j] * inv));
        out.q[r * k + b * kBlock + j] = static_cast<int8_t>(v);
        sum += v;
      }
      out.d[r * nb + b] = d;
      out.sum[r * nb + b] = sum;
    }
}

// The integer block products leave out, for weight row n and activation row r: q4_1's mins (min_w * d_x *
// sum(xq) per block), and with ``q8_offset`` the 128 that q8_0 weights were offset by (VNNI multiplies unsigned
// weights). Added to s block by block.
float add_block_offsets(float s, const Weights& w, const QuantRows& xq, int64_t n, int64_t r, bool q8_offset) {
  const int64_t nb = w.nb;
  const float* dx = xq.d.data() + r * nb;
  const int32_t* xs = xq.sum.data() + r * nb;
  if (w.kind == Kind::Q4_1) {
    const float* mn = w.mins + n * nb;
    for (int64_t b = 0; b < nb; ++b) s += mn[b] * dx[b] * static_cast<float>(xs[b]);
  } else if (q8_offset) {
    const float* dw = w.scales + n * nb;
    for (int64_t b = 0; b < nb; ++b) s -= 128.f * dw[b] * dx[b] * static_cast<float>(xs[b]);
  }
  return s;
}

// 64 weights of blocks b and b+1 as unsigned bytes laid out like the activations: [b 0..15, b 16..31,
// b+1 0..15, b+1 16..31].
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
inline __m512i weights64(const Weights& w, const uint8_t* q, int64_t b) {
  if (w.kind == Kind::Q4_1) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 16));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(raw, mask);                         // [b lo | b+1 lo]
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);  // [b hi | b+1 hi]
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);   // [b lo, b+1 lo, b hi, b+1 hi]
    return _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0));            // [b lo, b hi, b+1 lo, b+1 hi]
  }
  const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(q + b * kBlock));
  return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));   // int8 + 128 as uint8
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
void rows_vnni(const Weights& w, const QuantRows& xq, int64_t rows, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  const int64_t nb = w.nb, K = w.k;
  const int64_t pairs = nb / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = w.q + n * w.row_bytes;
    const float* dw = w.scales + n * nb;
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* xr = xq.q.data() + r * K;
      const float* dx = xq.d.data() + r * nb;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t b = 2 * p;
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights64(w, q, b),
                                                _mm512_loadu_si512(reinterpret_cast<const void*>(xr + b * kBlock)));
        const __m512 scale = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(dw[b] * dx[b])),
                                                _mm256_set1_ps(dw[b + 1] * dx[b + 1]), 1);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
      }
      float s = _mm512_reduce_add_ps(acc);
      for (int64_t b = 2 * pairs; b < nb; ++b) {   // an odd last block
        int32_t dot = 0;
        for (int j = 0; j < 16 && w.kind == Kind::Q4_1; ++j)
          dot += (q[b * 16 + j] & 0x0F) * xr[b * kBlock + j] + (q[b * 16 + j] >> 4) * xr[b * kBlock + j + 16];
        for (int j = 0; j < kBlock && w.kind == Kind::Q8_0; ++j)
          dot += (static_cast<int>(reinterpret_cast<const int8_t*>(q)[b * kBlock + j]) + 128) * xr[b * kBlock + j];
        s += dw[b] * dx[b] * static_cast<float>(dot);
      }
      y[r * ldy + n] = add_block_offsets(s, w, xq, n, r, /*q8_offset=*/true);
    }
  }
}

// ------------------------------------------------------------------------------------------ AVX-512 BF16
// From four activation rows on (prefill chunks, batched decode) the products are the work, not reading the
// weights. With AVX512-BF16, the activations are rounded to bf16 once per call (round to nearest even), four
// weight rows at a time are dequantized into an L1 buffer of bf16 (scale * q + min in fp32, then rounded),
// and one vdpbf16ps takes 32 products with fp32 sums: twice what an fp32 FMA does, in the same 4 x 4 tiles as
// the fp32 path. Each product is off by at most ~2^-7 of |w x| (both factors rounded to 8 significant bits);
// the sums stay fp32.
#define TY_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

TY_BF16_TARGET void round_to_bf16(const float* x, int64_t n, uint16_t* out) {   // n: a multiple of 32
  for (int64_t i = 0; i < n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<const __m512i&>(v));
  }
}

TY_BF16_TARGET inline void dequant_row_bf16(const Weights& w, int64_t n, uint16_t* out) {
  for (int64_t b = 0; b < w.nb; ++b) {
    __m512 lo, hi;
    scaled_block512(w, n, b, lo, hi);
    const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + b * kBlock), reinterpret_cast<const __m512i&>(v));
  }
}

TY_BF16_TARGET inline __m512bh load_bf16(const uint16_t* p) {
  const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(p));
  return reinterpret_cast<const __m512bh&>(v);
}

// The four sums of four accumulators, in order, as one 128-bit vector (cheaper than four separate reductions).
TY_BF16_TARGET inline __m256 half_sum(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

TY_BF16_TARGET inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const auto half = half_sum;
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(half(a0), half(a1)), _mm256_hadd_ps(half(a2), half(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// x: [rows, K] already in bf16.
TY_BF16_TARGET void rows_bf16(const Weights& w, const uint16_t* x, int64_t rows, int64_t n0, int64_t n1,
                              float* y, int64_t ldy) {
  const int64_t K = w.k;
  std::vector<uint16_t> buf(4 * K);
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t NR = std::min<int64_t>(4, n1 - n);
    for (int64_t j = 0; j < NR; ++j) dequant_row_bf16(w, n + j, buf.data() + j * K);
    const uint16_t* w0 = buf.data();
    int64_t r = 0;
    if (NR == 4) {
      for (; r + 4 <= rows; r += 4) {
        const uint16_t* x0 = x + r * K;
        __m512 a[4][4];
        for (auto& row : a)
          for (auto& v : row) v = _mm512_setzero_ps();
        for (int64_t i = 0; i < K; i += 32) {
          const __m512bh wv[4] = {load_bf16(w0 + i), load_bf16(w0 + K + i), load_bf16(w0 + 2 * K + i),
                                  load_bf16(w0 + 3 * K + i)};
          for (int rr = 0; rr < 4; ++rr) {
            const __m512bh xv = load_bf16(x0 + rr * K + i);
            for (int jj = 0; jj < 4; ++jj) a[rr][jj] = _mm512_dpbf16_ps(a[rr][jj], xv, wv[jj]);
          }
        }
        for (int rr = 0; rr < 4; ++rr)
          _mm_storeu_ps(y + (r + rr) * ldy + n, sum4(a[rr][0], a[rr][1], a[rr][2], a[rr][3]));
      }
    }
    for (; r < rows; ++r) {   // leftover activation rows (and every row when fewer than 4 weight rows are left)
      const uint16_t* xr = x + r * K;
      for (int64_t j = 0; j < NR; ++j) {
        const uint16_t* wr = w0 + j * K;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < K; i += 32) acc = _mm512_dpbf16_ps(acc, load_bf16(xr + i), load_bf16(wr + i));
        y[r * ldy + n + j] = _mm512_reduce_add_ps(acc);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ AVX2 int8
// The int8-activation path of CPUs without VNNI (AVX2 machines; AVX-512 ones before VNNI): the same activation
// blocks, 32 products per vpmaddubsw (unsigned 8-bit x signed 8-bit, adjacent pairs summed to int16), then
// vpmaddwd by ones to int32. q4_1's nibbles are small enough that no int16 sum saturates (2 * 15 * 127); for
// q8_0, llama.cpp's sign trick: |w| x (x with w's sign), at most 2 * 127 * 127. The sums are exact, so this
// path gives the VNNI path's results up to the order of fp32 additions.
__attribute__((target("avx2,fma")))
inline __m256i weights32_avx2(const Weights& w, const uint8_t* q, int64_t b, const __m256i x, __m256i& xs) {
  if (w.kind == Kind::Q4_1) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    xs = x;
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
  }
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
  xs = _mm256_sign_epi8(x, v);
  return _mm256_abs_epi8(v);   // q8_0 weights are within -127..127
}

__attribute__((target("avx2,fma")))
void rows_int8_avx2(const Weights& w, const QuantRows& xq, int64_t rows, int64_t n0, int64_t n1, float* y,
                    int64_t ldy) {
  const int64_t nb = w.nb, K = w.k;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = w.q + n * w.row_bytes;
    const float* dw = w.scales + n * nb;
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* xr = xq.q.data() + r * K;
      const float* dx = xq.d.data() + r * nb;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * kBlock));
        __m256i xs;
        const __m256i wu = weights32_avx2(w, q, b, x, xs);
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xs), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw[b] * dx[b]), acc);
      }
      y[r * ldy + n] = add_block_offsets(hsum256(acc), w, xq, n, r, /*q8_offset=*/false);
    }
  }
}

// ------------------------------------------------------------------------------------------ choosing paths
// What this CPU has, less what TOKENYARD_QUANT_ISA asks to leave out (the tests and benchmarks run each):
//   avx512  AVX-512 without VNNI and BF16 (an early AVX-512 CPU): fp32 tiles, AVX2 int8 for 1-3 rows
//   avx2    an AVX2-only CPU: AVX2 fp32 tiles, AVX2 int8 for 1-3 rows
//   scalar  scalar fp32 loops only
struct Isa {
  bool avx512, vnni, bf16, avx2;
};

Isa isa() {
  const char* want = std::getenv("TOKENYARD_QUANT_ISA");
  const std::string ask = want ? want : "";
  Isa i;
  i.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && ask != "scalar";
  i.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && ask != "scalar" &&
             ask != "avx2";
  i.vnni = i.avx512 && __builtin_cpu_supports("avx512vnni") && ask.empty();
  i.bf16 = i.avx512 && __builtin_cpu_supports("avx512bf16") && ask.empty();
  return i;
}

using RowsFn = void (*)(const Weights&, const float*, int64_t, int64_t, int64_t, float*, int64_t);
using IntRowsFn = void (*)(const Weights&, const QuantRows&, int64_t, int64_t, int64_t, float*, int64_t);

RowsFn pick_rows_fn(const Isa& i) {
  return i.avx512 ? &rows_avx512 : i.avx2 ? &rows_avx2 : &rows_scalar;
}

IntRowsFn pick_int_rows_fn(const Isa& i) {
  return i.vnni ? &rows_vnni : i.avx2 ? &rows_int8_avx2 : nullptr;
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
  tokenyard_parallel_for(0, w.n, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequant_row_scalar(w, n, o + n * w.k);
  });
  return out;
}

// x [T, K] fp32 times the quantized weight's transpose: [T, N] (F.linear's contract), plus an optional bias.
torch::Tensor quant_linear(const torch::Tensor& x_in, const torch::Tensor& q, const torch::Tensor& scales,
                           const torch::Tensor& mins, const c10::optional<torch::Tensor>& bias,
                           bool round_activations) {
  const Weights w = describe(q, scales, mins);
  TORCH_CHECK(x_in.dtype() == torch::kFloat32 && x_in.size(-1) == w.k, "quant_linear: fp32 x with K columns");
  const auto x = x_in.reshape({-1, w.k}).contiguous();
  const int64_t T = x.size(0);
  auto y = torch::empty({T, w.n}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Isa cpu = isa();
  const IntRowsFn int_rows = pick_int_rows_fn(cpu);
  if (round_activations && T <= kIntRows && int_rows) {
    QuantRows xq;
    quantize_rows(xp, T, w.k, xq);
    tokenyard_parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) { int_rows(w, xq, T, n0, n1, yp, w.n); });
  } else if (round_activations && T > kIntRows && cpu.bf16) {
    std::vector<uint16_t> xb(T * w.k);
    tokenyard_parallel_for(0, T, 16, [&](int64_t r0, int64_t r1) {
      round_to_bf16(xp + r0 * w.k, (r1 - r0) * w.k, xb.data() + r0 * w.k);
    });
    for (int64_t r0 = 0; r0 < T; r0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, T - r0);
      tokenyard_parallel_for(0, (w.n + 3) / 4, 4, [&](int64_t g0, int64_t g1) {
        rows_bf16(w, xb.data() + r0 * w.k, rows, 4 * g0, std::min(w.n, 4 * g1), yp + r0 * w.n, w.n);
      });
    }
  } else {
    const RowsFn fn = pick_rows_fn(cpu);
    // Activation rows in chunks that stay in L2 while every weight row passes over them.
    for (int64_t r0 = 0; r0 < T; r0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, T - r0);
      tokenyard_parallel_for(0, (w.n + 3) / 4, 4, [&](int64_t g0, int64_t g1) {
        fn(w, xp + r0 * w.k, rows, 4 * g0, std::min(w.n, 4 * g1), yp + r0 * w.n, w.n);
      });
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  auto shape = x_in.sizes().vec();
  shape.back() = w.n;
  return y.view(shape);
}

std::string quant_isa() {
  const Isa cpu = isa();
  const RowsFn fn = pick_rows_fn(cpu);
  const IntRowsFn int_rows = pick_int_rows_fn(cpu);
  std::string name = fn == &rows_avx512 ? "avx512" : fn == &rows_avx2 ? "avx2" : "scalar";
  if (int_rows) name += int_rows == &rows_vnni ? "+vnni" : "+int8";
  return cpu.bf16 ? name + "+bf16" : name;
}

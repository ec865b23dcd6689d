// Decode attention straight from the paged KV cache: each query token attends to the keys and values of
// its own sequence, found through the sequence's block table, without first gathering them into a padded
// tensor. The gather that pure PyTorch needs reads and writes every cached key and value once more each
// layer; on a CPU, where decode attention is bound by memory bandwidth, that copy was most of a step.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

torch::Tensor paged_decode_attention(
    const torch::Tensor& q,             // [n, heads, dim] float32
    const torch::Tensor& k_cache,       // [num_blocks, block_size, kv_heads, dim] float32
    const torch::Tensor& v_cache,       // same
    const torch::Tensor& block_tables,  // [n, max_blocks] int64
    const torch::Tensor& context_lens,  // [n] int64: keys each query attends to (its own included)
    double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous(), "contiguous tables");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t group = heads / kv_heads;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  // One work item per sequence: its keys for all kv heads sit together in each block row, so reads are
  // contiguous. Within a block, token t's row for kv head kh starts at ((block * bs + t) * kv_heads + kh) * dim.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(heads * dim);
    std::vector<float> sums(heads);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t len = lens[s];
      const int64_t* table = bt + s * max_blocks;
      const float* qs = qp + s * heads * dim;
      scores.resize(heads * len);
      for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
        const int64_t rows = std::min(block_size, len - t0);
        const float* kb = kp + table[b] * block_size * kv_heads * dim;
        for (int64_t r = 0; r < rows; ++r) {
          const float* kr = kb + r * kv_heads * dim;
          for (int64_t h = 0; h < heads; ++h) {
            const float* qh = qs + h * dim;
            const float* kt = kr + (h / group) * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < dim; ++d) dot += qh[d] * kt[d];
            scores[h * len + t0 + r] = dot * fscale;
          }
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* sc = scores.data() + h * len;
        const float mx = *std::max_element(sc, sc + len);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sc[t] = std::exp(sc[t] - mx);
          sum += sc[t];
        }
        sums[h] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
        const int64_t rows = std::min(block_size, len - t0);
        const float* vb = vp + table[b] * block_size * kv_heads * dim;
        for (int64_t r = 0; r < rows; ++r) {
          const float* vr = vb + r * kv_heads * dim;
          for (int64_t h = 0; h < heads; ++h) {
            const float p = scores[h * len + t0 + r];
            const float* vt = vr + (h / group) * dim;
            float* a = acc.data() + h * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) a[d] += p * vt[d];
          }
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* o = op + (s * heads + h) * dim;
        const float inv = 1.f / sums[h];
        for (int64_t d = 0; d < dim; ++d) o[d] = acc[h * dim + d] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}

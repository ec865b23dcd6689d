// Decode attention straight from the paged KV cache: each query token attends to the keys and values of
// its own sequence, found through the sequence's block table, without first gathering them into a padded
// tensor. The gather that pure PyTorch needs reads and writes every cached key and value once more each
// layer; on a CPU, where decode attention is bound by memory bandwidth, that copy was most of a step.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <functional>
#include <vector>

// The kernels' parallel loops run on tokenyard's own thread pool (thread_pool.cpp says why).
void tokenyard_pool_spin_long(bool on);   // thread_pool.cpp
void tokenyard_parallel_for(int64_t begin, int64_t end, int64_t grain,
                            const std::function<void(int64_t, int64_t)>& fn);

// The KV cache is block-major ([num_blocks, layers, 2, block_size, kv_heads, dim], see engine/kv_store.py): one
// layer's keys are a view whose blocks lie block_stride floats apart, each block's rows contiguous.
static bool blocks_dense(const torch::Tensor& c) {
  return c.dim() == 4 && c.stride(3) == 1 && c.stride(2) == c.size(3) && c.stride(1) == c.size(2) * c.size(3);
}

torch::Tensor paged_decode_attention(
    const torch::Tensor& q,             // [n, heads, dim] float32
    const torch::Tensor& k_cache,       // [num_blocks, block_size, kv_heads, dim] float32; rows of a block
    const torch::Tensor& v_cache,       // contiguous, blocks any stride apart (block-major cache, one layer)
    const torch::Tensor& block_tables,  // [n, max_blocks] int64
    const torch::Tensor& context_lens,  // [n] int64: keys each query attends to (its own included)
    double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(q.is_contiguous() && blocks_dense(k_cache) && blocks_dense(v_cache), "contiguous inputs");
  TORCH_CHECK(k_cache.stride(0) == v_cache.stride(0), "k and v caches must share a block stride");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous(), "contiguous tables");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t block_stride = k_cache.stride(0);
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

  // A work item is one sequence (all heads), or, when there are too few sequences to keep every thread
  // busy (a single stream), one kv head of one sequence with its query-head group. Per-sequence items read
  // each block row contiguously. Within a block, token r's row for kv head kh starts at
  // block * block_stride + (r * kv_heads + kh) * dim.
  const bool by_kv_head = n < 2 * at::get_num_threads();
  const int64_t items = by_kv_head ? n * kv_heads : n;
  const int64_t span = by_kv_head ? group : heads;
  tokenyard_parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(span * dim);
    std::vector<float> sums(span);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t s = by_kv_head ? w / kv_heads : w;
      const int64_t h0 = by_kv_head ? (w % kv_heads) * group : 0;
      const int64_t len = lens[s];
      const int64_t* table = bt + s * max_blocks;
      const float* qs = qp + (s * heads + h0) * dim;
      scores.resize(span * len);
      for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
        const int64_t rows = std::min(block_size, len - t0);
        const float* kb = kp + table[b] * block_stride;
        for (int64_t r = 0; r < rows; ++r) {
          const float* kr = kb + r * kv_heads * dim;
          for (int64_t h = 0; h < span; ++h) {
            const float* qh = qs + h * dim;
            const float* kt = kr + ((h0 + h) / group) * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < dim; ++d) dot += qh[d] * kt[d];
            scores[h * len + t0 + r] = dot * fscale;
          }
        }
      }
      for (int64_t h = 0; h < span; ++h) {
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
        const float* vb = vp + table[b] * block_stride;
        for (int64_t r = 0; r < rows; ++r) {
          const float* vr = vb + r * kv_heads * dim;
          for (int64_t h = 0; h < span; ++h) {
            const float p = scores[h * len + t0 + r];
            const float* vt = vr + ((h0 + h) / group) * dim;
            float* a = acc.data() + h * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) a[d] += p * vt[d];
          }
        }
      }
      for (int64_t h = 0; h < span; ++h) {
        float* o = op + (s * heads + h0 + h) * dim;
        const float inv = 1.f / sums[h];
        for (int64_t d = 0; d < dim; ++d) o[d] = acc[h * dim + d] * inv;
      }
    }
  });
  return out;
}


// The two ops below fuse runs of small elementwise PyTorch ops that cost more in per-op dispatch than in
// arithmetic at decode sizes. Each does exactly the same IEEE operations in the same order as the PyTorch
// code it replaces (built with -ffp-contract=off, so no FMA contraction), so results are bit for bit equal.

// RMSNorm's tail: out = (x * (1 / sqrt(var + eps))) * weight, with var = mean(x^2) computed by PyTorch.
torch::Tensor rms_norm_apply(const torch::Tensor& x, const torch::Tensor& var, const torch::Tensor& weight,
                             double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous [T, H] float32");
  TORCH_CHECK(var.is_contiguous() && weight.is_contiguous(), "contiguous var and weight");
  const int64_t rows = x.size(0), h = x.size(1);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* vp = var.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  tokenyard_parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float inv = 1.f / std::sqrt(vp[r] + feps);
      const float* xr = xp + r * h;
      float* o = op + r * h;
      for (int64_t i = 0; i < h; ++i) {
        const float t = xr[i] * inv;
        o[i] = t * wp[i];
      }
    }
  });
  return out;
}

// RoPE on q and k (rotate-half form with the sign folded into sin), k and v written to their cache slots.
// qkv: [T, (heads + 2 * kv_heads) * dim]; cos, sin: [T, dim]. Returns q and k rotated: [T, heads, dim],
// [T, kv_heads, dim] (k is also what a fresh prefill attends to).
std::vector<torch::Tensor> rope_and_cache(const torch::Tensor& qkv, const torch::Tensor& cos,
                                          const torch::Tensor& sin, torch::Tensor& k_cache,
                                          torch::Tensor& v_cache, const torch::Tensor& slots, int64_t heads,
                                          int64_t kv_heads) {
  TORCH_CHECK(qkv.dtype() == torch::kFloat32 && qkv.is_contiguous(), "qkv: contiguous float32");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && slots.is_contiguous(), "contiguous tables");
  TORCH_CHECK(blocks_dense(k_cache) && blocks_dense(v_cache), "caches: rows of a block must be contiguous");
  TORCH_CHECK(k_cache.stride(0) == v_cache.stride(0), "k and v caches must share a block stride");
  const int64_t T = qkv.size(0), dim = cos.size(1), half = dim / 2;
  const int64_t block_size = k_cache.size(1), block_stride = k_cache.stride(0);
  const int64_t width = qkv.size(1);
  TORCH_CHECK(width == (heads + 2 * kv_heads) * dim, "qkv width does not match the head counts");
  auto q = torch::empty({T, heads, dim}, qkv.options());
  auto k = torch::empty({T, kv_heads, dim}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t kv_row = kv_heads * dim;
  tokenyard_parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = src + t * width;
      const float* c = cp + t * dim;
      const float* s = sp + t * dim;
      for (int64_t hd = 0; hd < heads + kv_heads; ++hd) {
        const float* x = row + hd * dim;
        float* o = hd < heads ? qp + (t * heads + hd) * dim : kp + (t * kv_heads + hd - heads) * dim;
        for (int64_t i = 0; i < dim; ++i) {
          const float rolled = i < half ? x[i + half] : x[i - half];
          const float a = x[i] * c[i];
          const float b = rolled * s[i];
          o[i] = a + b;
        }
      }
      const int64_t at = (slot[t] / block_size) * block_stride + (slot[t] % block_size) * kv_row;
      std::memcpy(kc + at, kp + t * kv_row, kv_row * sizeof(float));
      std::memcpy(vc + at, row + (heads + kv_heads) * dim, kv_row * sizeof(float));
    }
  });
  return {q, k};
}

// Every layer of a decode-only step in one call. The arithmetic is the same ATen ops (and the fused ops
// above) that model/llama.py calls from Python, in the same order, so results are bit for bit equal; what
// goes away is Python's per-op overhead, which at decode sizes is a good part of a step's non-GEMM time.
torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                           const torch::Tensor& mins, const c10::optional<torch::Tensor>& bias,
                           bool round_activations);

// A linear layer given as three tensors: (W, empty, empty) in fp32, or (q, scales, mins) block-quantized.
static torch::Tensor linear3(const torch::Tensor& x, const torch::Tensor* w,
                             const torch::Tensor& bias = torch::Tensor()) {
  const bool has_bias = bias.defined() && bias.numel();
  if (w[1].numel())
    return quant_linear(x, w[0], w[1], w[2], has_bias ? c10::optional<torch::Tensor>(bias) : c10::nullopt, true);
  return has_bias ? at::linear(x, w[0], bias) : at::linear(x, w[0]);
}

// weights: 15 tensors per layer (see below).
torch::Tensor decode_layers(torch::Tensor x, const std::vector<torch::Tensor>& weights, const torch::Tensor& cos,
                            const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache,
                            const torch::Tensor& slots, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, int64_t heads, int64_t kv_heads, double eps,
                            double scale) {
  // Per layer: input norm, QKV (3), o (3), post norm, gate/up (3), down (3), QKV bias (LlamaModel._flat_weights).
  constexpr int64_t kPerLayer = 15;
  const int64_t layers = static_cast<int64_t>(weights.size()) / kPerLayer;
  const int64_t T = x.size(0);
  for (int64_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = weights.data() + kPerLayer * l;
    torch::Tensor k_l = k_cache.select(1, l);   // caches: [num_blocks, layers, block_size, kv_heads, dim]
    torch::Tensor v_l = v_cache.select(1, l);
    torch::Tensor h = rms_norm_apply(x, x.pow(2).mean(-1, true), w[0], eps);
    torch::Tensor qkv = linear3(h, w + 1, w[14]);
    std::vector<torch::Tensor> qk = rope_and_cache(qkv, cos, sin, k_l, v_l, slots, heads, kv_heads);
    torch::Tensor attn = paged_decode_attention(qk[0], k_l, v_l, block_tables, context_lens, scale);
    x.add_(linear3(attn.reshape({T, -1}), w + 4));
    h = rms_norm_apply(x, x.pow(2).mean(-1, true), w[7], eps);
    torch::Tensor gate_up = linear3(h, w + 8);
    const int64_t inter = gate_up.size(1) / 2;
    x.add_(linear3(at::silu(gate_up.slice(1, 0, inter)).mul_(gate_up.slice(1, inter)), w + 11));
  }
  return x;
}

// Block-quantized linear layers (quant_matmul.cpp, compiled into the same module).
torch::Tensor quant_dequantize(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& mins);
std::string quant_isa();

// Every op releases the GIL while it runs: tensors only, no Python objects. In the server the engine loop's
// forward pass then runs beside the event loop's streaming instead of taking turns with it.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "x @ W.T for a block-quantized W (q4_1 or q8_0), plus an optional bias",
        py::arg("x"), py::arg("q"), py::arg("scales"), py::arg("mins"), py::arg("bias"),
        py::arg("round_activations") = true, py::call_guard<py::gil_scoped_release>());
  m.def("quant_dequantize", &quant_dequantize, "the fp32 matrix of a block-quantized weight",
        py::call_guard<py::gil_scoped_release>());
  m.def("pool_spin_long", &tokenyard_pool_spin_long,
        "idle kernel-pool workers spin long (decode-only steps) or briefly (steps that run ATen ops between kernels)");
  m.def("quant_isa", &quant_isa, "the instruction set quant_linear runs with here",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_apply", &rms_norm_apply, "RMSNorm scaling, given the mean of squares",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_and_cache", &rope_and_cache, "RoPE on q and k; k and v written to their cache slots",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_layers", &decode_layers, "all decoder layers of a decode-only step",
        py::call_guard<py::gil_scoped_release>());
}

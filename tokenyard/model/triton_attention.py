"""Paged decode attention for CUDA, written in Triton: each query reads its keys and values in place through its
block table, so no padded copy of the context is gathered per layer (what the SDPA fallback does).

One program per (sequence, kv head) handles that kv head's whole query-head group (GQA): the group's queries
share every key and value they load, and the products run as ``tl.dot`` on tensor cores. Keys are visited in
tiles of ``TILE`` tokens; a tile may span several KV blocks, each token's block found through the table.
Scores, the running max and the sums are kept in fp32 (an online softmax), whatever the cache's dtype. The
loop bound is read from ``context_lens`` on the device, so one compiled kernel serves every context length
and a CUDA graph can replay it as lengths grow.

This module imports Triton; ``paged_attention.load_triton_kernel`` imports it only when a CUDA device asks
for it. With ``TRITON_INTERPRET=1`` set before Triton is imported, the kernel runs on CPU tensors (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr,
    scale,
    q_stride_s, q_stride_h,
    cache_stride_block, cache_stride_token, cache_stride_head,
    table_stride,
    out_stride_s, out_stride_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    head_ok = g < GROUP
    heads = kv_head * GROUP + g                                   # this program's query heads
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < DIM
    q = tl.load(q_ptr + seq * q_stride_s + heads[:, None] * q_stride_h + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)   # [GROUP_PAD, DIM_PAD]
    ctx = tl.load(lens_ptr + seq)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    offs = tl.arange(0, TILE)
    for start in range(0, ctx, TILE):
        tok = start + offs
        tok_ok = tok < ctx
        block = tl.load(tables_ptr + seq * table_stride + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        row = block * cache_stride_block + (tok % BLOCK_SIZE) * cache_stride_token + kv_head * cache_stride_head
        kv_mask = tok_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + row[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # [TILE, D]
        v = tl.load(v_ptr + row[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = tl.where(tok_ok[None, :], scores * scale, float("-inf"))             # [GROUP_PAD, TILE]
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    out = acc / s[:, None]
    tl.store(out_ptr + seq * out_stride_s + heads[:, None] * out_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def paged_decode_attention(
    q: torch.Tensor,             # [n, heads, dim]
    k_cache: torch.Tensor,       # [num_blocks, block_size, kv_heads, dim], one layer: a strided view whose blocks
    v_cache: torch.Tensor,       # lie any stride apart, each block's rows contiguous (engine/kv_store.py)
    block_tables: torch.Tensor,  # [n, max_blocks] int32 or int64
    context_lens: torch.Tensor,  # [n] keys each query attends to, its own included (>= 1)
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    n, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("paged_decode_attention: k and v caches must share strides, with contiguous rows")
    group = heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    tile = max(block_size, 32 if dim > 64 else 64)
    _paged_decode_kernel[(n, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        # tl.dot wants every dimension >= 16: the head group is padded (masked rows cost a little arithmetic).
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16), DIM=dim,
        DIM_PAD=max(triton.next_power_of_2(dim), 16), BLOCK_SIZE=block_size, TILE=triton.next_power_of_2(tile),
        # Products in fp32 from values upcast on load. A bf16 or fp16 value is exact in tf32, so tf32 tensor
        # cores lose nothing there; an fp32 cache gets full fp32 products ("ieee"): tf32 would round them and
        # change greedy tokens against the fp32 reference.
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
    )
    return out

"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) over a paged KV cache.

Written as plain functions over weight tensors rather than ``nn.Module`` trees: per-step Python overhead
is what limits decode speed on small models, and each module call costs hooks and attribute lookups.

Every step runs one flat batch of tokens (decodes first, then prefill chunks). The linear layers see the
whole flat batch; attention runs once for all decodes (keys gathered from their block tables, padding
masked) and once per prefill chunk (causal with an offset when earlier chunks are cached).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tokenyard.model import quant
from tokenyard.model.config import ModelConfig
from tokenyard.model.paged_attention import decode_attention, decode_backend, load_kernel
from tokenyard.model.quant import QuantWeight

_CUDA_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    o_bias: torch.Tensor | None = None        # Llama with attention_bias: o_proj has one too (Qwen2: no)
    gate_up_bias: torch.Tensor | None = None  # mlp_bias
    down_bias: torch.Tensor | None = None

    @property
    def has_extra_biases(self) -> bool:
        return self.o_bias is not None or self.gate_up_bias is not None or self.down_bias is not None


@dataclass
class PrefillChunk:
    q_start: int               # row of the chunk's first token in the flat batch
    q_len: int
    start_pos: int             # tokens already in the cache before this chunk
    block_ids: torch.Tensor    # [num_blocks] long
    mask: torch.Tensor | None  # [q_len, start_pos + q_len] bool, None when start_pos == 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor              # [T] flat cache slot of each new token
    num_decodes: int                        # the first rows of the batch are single-token decodes
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor | None        # [num_decodes, 1, 1, max_blocks * block_size] bool
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64, the current token included
    prefills: list[PrefillChunk]

    @classmethod
    def whole_prompt(cls, slot_mapping: torch.Tensor) -> AttentionMetadata:
        """One prefill chunk of a whole prompt (nothing cached before it), its tokens written to these slots."""
        return cls(slot_mapping=slot_mapping, num_decodes=0, decode_block_tables=None, decode_mask=None,
                   decode_context_lens=None, prefills=[PrefillChunk(0, len(slot_mapping), 0, None, None)])


class LlamaWeights:
    """Weights in the layout the forward pass wants: fused QKV and gate/up projections."""

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        used: set[str] = set()
        self.dtype = dtype

        def get(name: str):
            try:
                t = state[name]
            except KeyError:
                raise ValueError(f"model: weight {name!r} missing from checkpoint") from None
            used.add(name)
            if isinstance(t, QuantWeight):   # kept as blocks: CPU, fp32 activations (checked by the engine)
                return t
            return t.to(device=device, dtype=dtype).contiguous()

        def fuse(parts):
            """Fused projections: quantized parts stack as blocks; a mix is dequantized."""
            if all(isinstance(p, QuantWeight) for p in parts):
                return QuantWeight.cat(parts)
            return torch.cat([p.dequantize() if isinstance(p, QuantWeight) else p for p in parts])

        def maybe(name: str) -> torch.Tensor | None:
            return get(name) if name in state else None

        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        if cfg.tie_word_embeddings or "lm_head.weight" not in state:
            self.lm_head = self.embed
            used.add("lm_head.weight")   # a tied checkpoint may store a copy; the embedding is what is used
        else:
            self.lm_head = get("lm_head.weight")
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv_bias = None
            if cfg.attention_bias:
                qkv_bias = torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
            gate_up_bias = down_bias = None
            if cfg.mlp_bias:
                gate_up_bias = torch.cat([get(p + "mlp.gate_proj.bias"), get(p + "mlp.up_proj.bias")])
                down_bias = get(p + "mlp.down_proj.bias")
            self.layers.append(LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                qkv=fuse([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
                qkv_bias=qkv_bias,
                o=get(p + "self_attn.o_proj.weight"),
                post_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=fuse([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                down=get(p + "mlp.down_proj.weight"),
                o_bias=maybe(p + "self_attn.o_proj.bias"),
                gate_up_bias=gate_up_bias,
                down_bias=down_bias,
            ))
        # A tensor nobody reads would mean computing something other than the checkpoint: refuse instead.
        unused = sorted(k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq"))
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise ValueError(f"model: the checkpoint has weights this Llama-family model does not use: "
                             f"{', '.join(unused[:5])}{more}")


def rope_tables(cfg: ModelConfig, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin, [max_len, head_dim], computed as Hugging Face computes its tables.

    HF rotates with ``x * cos + cat(-x2, x1) * sin``. Folding the minus into the first half of ``sin`` turns
    that into ``x * cos + roll(x, half) * sin'``: fewer ops, and bit for bit the same (negation is exact).
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    pos = torch.arange(max_len, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : dim // 2] = -sin[:, : dim // 2]
    return emb.cos().to(device), sin.to(device)


def _cache_rows(layer_cache: torch.Tensor) -> torch.Tensor:
    """[rows, kv_heads, head_dim] over one layer's cache view [num_blocks, block_size, kv_heads, head_dim], whose
    blocks lie ``stride(0)`` apart (block-major cache) and whose rows within a block are contiguous. Row
    ``block * stride(0) / row_size + offset`` is the token at ``offset`` in ``block``; the rows between blocks
    belong to other layers and are never indexed here."""
    nb, bs, kvh, d = layer_cache.shape
    row = kvh * d
    assert layer_cache.stride()[1:] == (row, d, 1) and layer_cache.stride(0) % row == 0
    n_rows = (nb - 1) * (layer_cache.stride(0) // row) + bs
    return layer_cache.as_strided((n_rows, kvh, d), (row, d, 1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm arithmetic, op for op, so results match it bit for bit. (F.rms_norm gives
    # the same bits but is a composite op that costs more per call at decode sizes.)
    # In-place where the operand is a fresh temporary: same arithmetic, fewer allocations.
    if x.dtype != torch.float32:
        # Half precision: transformers normalizes in fp32 and casts back before the weight multiplies.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))).to(x.dtype).mul_(weight)
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))).mul_(weight)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: LlamaWeights, max_len: int, device: torch.device) -> None:
        self.cfg = cfg
        self.w = weights
        self.device = device
        # Computed in fp32, then cast to the model's dtype, as transformers does (a no-op in fp32).
        self.cos, self.sin = (t.to(weights.dtype) for t in rope_tables(cfg, max_len, device))
        self.scale = cfg.head_dim ** -0.5
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.gqa = cfg.num_heads != cfg.num_kv_heads
        self.set_attn_backend(decode_backend(device, weights.dtype))
        self.fuse_decode_layers = True  # decode-only steps run the layer loop in C++ (when use_kernel)
        # The C++ layer loop knows the QKV bias only; o_proj and MLP biases take the Python loop.
        self.extra_biases = any(lw.has_extra_biases for lw in weights.layers)
        self._flat: list[torch.Tensor] | None = None

    def set_attn_backend(self, backend: str) -> None:
        """``cpu-kernel``, ``triton`` or ``sdpa`` (tests force the fallbacks through this)."""
        self.attn_backend = backend
        self.use_kernel = backend == "cpu-kernel"   # the C++ extension's fused paths come with its attention

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,      # [T]
        positions: torch.Tensor,      # [T]
        meta: AttentionMetadata,
        k_cache: torch.Tensor,        # [num_blocks, layers, block_size, kv_heads, head_dim], a view of the
                                      # block-major cache (engine/kv_store.py)
        v_cache: torch.Tensor,
        logits_rows: torch.Tensor,    # rows whose next-token logits are wanted
    ) -> torch.Tensor:
        cfg = self.cfg
        T = input_ids.shape[0]
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        half = D // 2
        qk_heads = H + KVH
        qk_size = self.q_size + self.kv_size
        cos = self.cos[positions]
        sin = self.sin[positions]
        slots = meta.slot_mapping
        linear, silu = quant.linear, F.silu
        fused = load_kernel() if self.use_kernel else None
        if fused is not None:
            def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                return fused.rms_norm_apply(x, x.pow(2).mean(-1, keepdim=True), weight, eps)
        else:
            def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                return rms_norm(x, weight, eps)
            cos3, sin3 = cos.unsqueeze(1), sin.unsqueeze(1)
            # The cache writes go through a flat, row-contiguous view of each layer's cache (one row: one
            # token's kv heads) with one index per new token, the same for every layer: a plain index_copy_,
            # where advanced indexing of the strided 4-d view costs more.
            bsz = k_cache.shape[2]
            block_rows = k_cache.stride(0) // (KVH * D)
            cache_rows = (slots // bsz) * block_rows + slots % bsz
        x = quant.embedding(input_ids, self.w.embed)
        fused_decode = fused is not None and self.fuse_decode_layers and not meta.prefills and not self.extra_biases
        if fused is not None:
            fused.pool_spin_long(fused_decode)
        if fused_decode:
            # Decode-only step: the whole layer loop in C++ (same ops, no Python per-op overhead).
            x = fused.decode_layers(x, self._flat_weights(), cos, sin, k_cache, v_cache, slots,
                                    meta.decode_block_tables, meta.decode_context_lens, H, KVH, eps, self.scale)
            return linear(norm(x[logits_rows], self.w.norm), self.w.lm_head, round_activations=False)
        for li, lw in enumerate(self.w.layers):
            h = norm(x, lw.input_norm)
            qkv = linear(h, lw.qkv, lw.qkv_bias)
            kc = k_cache[:, li]
            vc = v_cache[:, li]
            v = qkv[:, qk_size:].view(T, KVH, D)
            if fused is not None:  # RoPE and the cache writes in one call, same arithmetic
                q, k = fused.rope_and_cache(qkv, cos, sin, kc, vc, slots, H, KVH)
            else:
                # RoPE on q and k at once: [T, H + KVH, D].
                qk = qkv[:, :qk_size].view(T, qk_heads, D)
                qk = qk * cos3 + qk.roll(half, -1) * sin3
                q = qk[:, :H]
                k = qk[:, H:]
                _cache_rows(kc).index_copy_(0, cache_rows, k)
                _cache_rows(vc).index_copy_(0, cache_rows, v)
            attn = self._attention(q, k, v, kc, vc, meta)
            x.add_(linear(attn.reshape(T, H * D), lw.o, lw.o_bias))
            h = norm(x, lw.post_norm)
            gate_up = linear(h, lw.gate_up, lw.gate_up_bias)
            inter = gate_up.shape[-1] // 2
            x.add_(linear(silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), lw.down, lw.down_bias))
        x = norm(x[logits_rows], self.w.norm)
        return linear(x, self.w.lm_head, round_activations=False)

    def _flat_weights(self) -> list[torch.Tensor]:
        """Per layer 15 tensors for the C++ layer loop: input norm, QKV (3), o (3), post norm, gate/up (3),
        down (3), QKV bias. A linear weight is (W, empty, empty) in fp32, or (q, scales, mins-or-empty) when
        block-quantized."""
        if self._flat is None:
            empty = torch.empty(0, dtype=self.w.dtype, device=self.device)

            def lin(w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                return w.parts() if isinstance(w, QuantWeight) else (w, empty, empty)

            self._flat = [t for lw in self.w.layers for t in (
                lw.input_norm, *lin(lw.qkv), *lin(lw.o), lw.post_norm, *lin(lw.gate_up), *lin(lw.down),
                lw.qkv_bias if lw.qkv_bias is not None else empty)]
        return self._flat

    def _attention(self, q, k, v, kc, vc, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] (this step's); kc, vc: one layer's paged cache."""
        outs = []
        nd = meta.num_decodes
        if nd:
            outs.append(decode_attention(
                q[:nd], kc, vc, meta.decode_block_tables, meta.decode_context_lens, meta.decode_mask,
                self.scale, self.attn_backend,
            ))
        if meta.prefills:
            # On CUDA, keep SDPA off the cuDNN backend: it builds an execution plan per new shape, and prompt
            # lengths are all different (measured on an H200: ~360 ms per 4096-token prefill step, 98% of it
            # plan building; FlashAttention has no such cost).
            with sdpa_kernel(_CUDA_PREFILL_BACKENDS) if self.device.type == "cuda" else nullcontext():
                outs.extend(self._prefill_attention(q, k, v, kc, vc, meta.prefills))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _prefill_attention(self, q, k, v, kc, vc, prefills: list[PrefillChunk]) -> list[torch.Tensor]:
        D = self.cfg.head_dim
        KVH = self.cfg.num_kv_heads
        outs = []
        for pc in prefills:
            qs = q[pc.q_start:pc.q_start + pc.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if pc.start_pos == 0:
                keys = k[pc.q_start:pc.q_start + pc.q_len]
                vals = v[pc.q_start:pc.q_start + pc.q_len]
            else:
                kv_len = pc.start_pos + pc.q_len
                keys = kc.index_select(0, pc.block_ids).view(-1, KVH, D)[:kv_len]
                vals = vc.index_select(0, pc.block_ids).view(-1, KVH, D)[:kv_len]
            o = F.scaled_dot_product_attention(
                qs, keys.transpose(0, 1).unsqueeze(0), vals.transpose(0, 1).unsqueeze(0),
                attn_mask=pc.mask, is_causal=pc.mask is None, scale=self.scale, enable_gqa=self.gqa,
            )                                                      # [1, H, n, D]
            outs.append(o.squeeze(0).transpose(0, 1))
        return outs

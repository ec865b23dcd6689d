"""Block-quantized weights on CPU: GGUF's Q4_1 and Q8_0 kept as they are, or made at load from fp32.

A ``QuantWeight`` is a linear layer's weight [N, K] as K/32 blocks per row (``csrc/quant_matmul.cpp`` has the
formats and the kernels): ``q4_1`` is 4 bits a weight plus a scale and a min per block (5 bits a weight all
told), ``q8_0`` 8 bits plus a scale (9). ``linear()`` runs ``x @ W.T`` on either a QuantWeight or a plain
tensor, so the model code does not care which it holds. Embeddings look rows up in the quantized table.

What stays in fp32: norms, biases, activations, the KV cache, and every GGUF tensor of another type (F32/F16,
K-quants), which is dequantized at conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BLOCK = 32


@dataclass
class QuantWeight:
    q: torch.Tensor                # uint8 [N, K/2] nibbles (q4_1) or int8 [N, K] (q8_0)
    scales: torch.Tensor           # fp32 [N, K/32]
    mins: torch.Tensor | None      # fp32 [N, K/32] (q4_1), None for q8_0

    @property
    def kind(self) -> str:
        return "q4_1" if self.mins is not None else "q8_0"

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.scales.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.mins) if t is not None)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, scales, mins or an empty tensor): what the C++ kernels take."""
        return self.q, self.scales, self.mins if self.mins is not None else _EMPTY

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix [N, K] (pure PyTorch, the reference the kernels are tested against)."""
        n, k = self.shape
        s = self.scales.repeat_interleave(BLOCK, dim=1)
        if self.mins is None:
            return self.q.float() * s
        nb = k // BLOCK
        packed = self.q.view(n, nb, 16)
        nib = torch.cat([packed & 0x0F, packed >> 4], dim=2).reshape(n, k).float()
        return nib * s + self.mins.repeat_interleave(BLOCK, dim=1)

    def rows(self, index: torch.Tensor) -> QuantWeight:
        return QuantWeight(self.q[index], self.scales[index], None if self.mins is None else self.mins[index])

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Stack along the output dimension (fused QKV and gate/up projections)."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot fuse weights quantized differently: {sorted(kinds)}")
        mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
        return QuantWeight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), mins)


_EMPTY = torch.empty(0)


# --------------------------------------------------------------------------- from GGUF blocks
def from_gguf(raw: np.ndarray, kind: str, rows: int, cols: int) -> QuantWeight:
    """GGUF's bytes of a [rows, cols] Q4_1 or Q8_0 tensor (fp16 scale/min headers per block) as a QuantWeight."""
    nb = cols // BLOCK
    if kind == "Q4_1":
        blocks = np.ascontiguousarray(raw).reshape(rows, nb, 20)
        d = blocks[:, :, 0:2].copy().view(np.float16).reshape(rows, nb)
        m = blocks[:, :, 2:4].copy().view(np.float16).reshape(rows, nb)
        q = blocks[:, :, 4:20].reshape(rows, nb * 16)
        return QuantWeight(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(d.astype(np.float32)),
                           torch.from_numpy(m.astype(np.float32)))
    if kind == "Q8_0":
        blocks = np.ascontiguousarray(raw).reshape(rows, nb, 34)
        d = blocks[:, :, 0:2].copy().view(np.float16).reshape(rows, nb)
        q = blocks[:, :, 2:34].copy().view(np.int8).reshape(rows, cols)
        return QuantWeight(torch.from_numpy(q), torch.from_numpy(d.astype(np.float32)), None)
    raise ValueError(f"GGUF type {kind} is not kept quantized")


# --------------------------------------------------------------------------- made at load from fp32
def quantize(w: torch.Tensor, kind: str) -> QuantWeight:
    """fp32 [N, K] (K a multiple of 32) -> q8_0 (absmax/127 per block) or q4_1 (min..max in 15 steps)."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"cannot quantize a weight with {k} columns: not a multiple of {BLOCK}")
    b = w.float().reshape(n, k // BLOCK, BLOCK)
    if kind == "q8_0":
        d = b.abs().amax(-1) / 127.0
        q = torch.where(d[..., None] > 0, b / d.clamp(min=1e-30)[..., None], 0.0).round().clamp(-127, 127)
        return QuantWeight(q.to(torch.int8).reshape(n, k).contiguous(), d.contiguous(), None)
    if kind == "q4_1":
        lo, hi = b.amin(-1), b.amax(-1)
        d = (hi - lo) / 15.0
        q = torch.where(d[..., None] > 0, (b - lo[..., None]) / d.clamp(min=1e-30)[..., None], 0.0)
        q = q.round().clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        return QuantWeight(packed.reshape(n, k // 2).contiguous(), d.contiguous(), lo.contiguous())
    raise ValueError(f"unknown quantization {kind!r}")


# --------------------------------------------------------------------------- the ops
def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None,
           round_activations: bool = True) -> torch.Tensor:
    """With ``round_activations`` (the default) the kernel may round the activations where that is faster: to int8
    per block for 1-3 rows (AVX-512 VNNI), to bf16 from 4 rows on (AVX512-BF16). ``False`` keeps them fp32: the
    output layer asks for that, since rounding its input flips near-tie tokens."""
    if not isinstance(w, QuantWeight):
        return F.linear(x, w, bias)
    from tokenyard.model.paged_attention import load_kernel

    return load_kernel().quant_linear(x, *w.parts(), bias, round_activations)


def embedding(ids: torch.Tensor, w: torch.Tensor | QuantWeight) -> torch.Tensor:
    if not isinstance(w, QuantWeight):
        return F.embedding(ids, w)
    return w.rows(ids).dequantize()

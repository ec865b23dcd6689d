"""The KV cache's tensors, on the device and on the host, and the block copies between them.

Layout: block-major, ``[num_blocks, layers, 2 (k, v), block_size, kv_heads, head_dim]``. One block's keys and
values for every layer are one contiguous slab, so a run of consecutive block ids is one contiguous range and
a swap segment ``(src, dst, n)`` is a single copy, whatever the model's depth. (A layer-major cache needs one
copy per layer per tensor for the same run.) Attention reads one layer of it as a strided view
(``k_cache[:, layer]``: blocks ``layers * 2 * block_size * kv_heads * head_dim`` elements apart, each block's
rows contiguous), which is what the C++ kernel and the PyTorch fallback take.

The device tensor holds one block more than the pool hands out: the scratch block (``scratch_block``), which
the padding rows of a CUDA-graph decode batch write to and read from (engine/cuda_graphs.py).
"""

from __future__ import annotations

import torch

from tokenyard.model.config import ModelConfig

Segment = tuple[int, int, int]  # (first source block, first destination block, number of blocks)


class KVStore:
    def __init__(self, cfg: ModelConfig, *, num_blocks: int, num_host_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        block = (cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.device = device
        self.kv = torch.zeros((num_blocks + 1, *block), dtype=dtype, device=device)
        self.scratch_block = num_blocks
        # Pinned on CUDA so host<->device copies can run asynchronously on a side stream.
        self.host_kv = torch.zeros((num_host_blocks, *block), dtype=dtype, pin_memory=device.type == "cuda")
        self.k_cache = self.kv[:, :, 0]   # [num_blocks, layers, block_size, kv_heads, head_dim] views
        self.v_cache = self.kv[:, :, 1]
        self.block_bytes = self.kv[0].numel() * self.kv.element_size()

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @torch.inference_mode()
    def copy(self, segments: list[Segment], to_host: bool, non_blocking: bool = False) -> None:
        """Run the copies of one transfer: each segment is one ``copy_`` of ``n`` whole blocks."""
        src, dst = (self.kv, self.host_kv) if to_host else (self.host_kv, self.kv)
        for s, d, n in segments:
            dst[d:d + n].copy_(src[s:s + n], non_blocking=non_blocking)

"""Decode-only steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model on a GPU is bound by Python and kernel launches, not by the GPU: a 16-layer
model launches hundreds of kernels per step. Capturing the whole forward pass of a decode batch once and
replaying it costs one launch. A graph replays fixed addresses and shapes, so:

- every input lives in a static device buffer (token ids, positions, cache slots, block tables, context
  lengths), refilled before each replay from pinned host staging with asynchronous copies;
- a batch is padded up to the next bucket size. Padding rows decode token 0 at position 0 into the scratch
  block (``KVStore.scratch_block``, which no request owns) and attend to that one slot;
- block tables have the full width (``max_model_len / block_size``); the attention kernel reads each
  sequence's length on the device, so the same graph serves every context length.

Prefill and mixed steps run eagerly. ``capture=False`` runs the very same padded static-buffer path eagerly,
which is how the CPU tests check its bookkeeping (padding, staging, row selection) against the reference.
"""

from __future__ import annotations

import logging
import time

import torch

from tokenyard.model.llama import AttentionMetadata, LlamaModel
from tokenyard.sched.output import ScheduledChunk

log = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then steps of 8 up to 64, then of 32 (vLLM's spacing keeps
    padding under ~12% past 64 without capturing hundreds of graphs)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, min(max_batch, 64) + 1, 8)) + list(range(96, max_batch + 1, 32))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: LlamaModel, k_cache: torch.Tensor, v_cache: torch.Tensor, *, max_batch: int,
                 max_model_len: int, block_size: int, scratch_block: int, capture: bool = True) -> None:
        self.model = model
        self.k_cache, self.v_cache = k_cache, v_cache
        self.block_size = block_size
        self.buckets = graph_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.capture = capture
        dev = model.device
        B, W = self.max_batch, -(-max_model_len // block_size)
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        pin = dev.type == "cuda"
        # Host staging, pinned so the copies to the device buffers are asynchronous. Rows past the batch are
        # kept as padding rows (see the module docstring); refilling them costs a slice assignment.
        self.h_ids = torch.zeros(B, dtype=torch.long, pin_memory=pin)
        self.h_pos = torch.zeros(B, dtype=torch.long, pin_memory=pin)
        self.h_slots = torch.full((B,), self.scratch_slot, dtype=torch.long, pin_memory=pin)
        self.h_ctx = torch.ones(B, dtype=torch.long, pin_memory=pin)
        self.h_tables = torch.full((B, W), scratch_block, dtype=torch.long, pin_memory=pin)
        self.n_ids, self.n_pos, self.n_slots, self.n_ctx, self.n_tables = (
            t.numpy() for t in (self.h_ids, self.h_pos, self.h_slots, self.h_ctx, self.h_tables))
        self.ids, self.pos, self.slots, self.ctx, self.tables = (
            t.to(dev, copy=True) for t in (self.h_ids, self.h_pos, self.h_slots, self.h_ctx, self.h_tables))
        self.rows = torch.arange(B, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0
        self.num_replays = 0
        if capture:
            self._capture_all()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _meta(self, nb: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:nb], num_decodes=nb, decode_block_tables=self.tables[:nb],
                                 decode_mask=None, decode_context_lens=self.ctx[:nb], prefills=[])

    def _forward(self, nb: int) -> torch.Tensor:
        return self.model.forward(self.ids[:nb], self.pos[:nb], self._meta(nb), self.k_cache, self.v_cache,
                                  self.rows[:nb])

    def _capture_all(self) -> None:
        """Capture largest first, all graphs in one memory pool (a smaller graph reuses the larger's memory)."""
        t0 = time.perf_counter()
        pool = None
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for nb in reversed(self.buckets):
                for _ in range(2):       # warm up: Triton compiles, cuBLAS picks its kernels, outside capture
                    self._forward(nb)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[nb] = self._forward(nb)
                pool = graph.pool()
                self.graphs[nb] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(self.buckets), self.buckets[0],
                 self.max_batch, self.capture_s)

    def run(self, decodes: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [len(decodes), vocab] of one decode-only step (every row, sampled or not)."""
        n = len(decodes)
        nb = self.bucket(n)
        bs = self.block_size
        ids, pos, slots, ctx, tables = self.n_ids, self.n_pos, self.n_slots, self.n_ctx, self.n_tables
        for i, c in enumerate(decodes):
            p = c.start_pos
            bids = c.block_ids
            ids[i] = c.token_ids[0]
            pos[i] = p
            slots[i] = bids[p // bs] * bs + p % bs
            ctx[i] = p + 1
            tables[i, :len(bids)] = bids
        # Padding rows: token 0 at position 0, written to and read from the scratch slot alone.
        ids[n:nb] = 0
        pos[n:nb] = 0
        slots[n:nb] = self.scratch_slot
        ctx[n:nb] = 1
        tables[n:nb, 0] = self.scratch_block
        for dst, src in ((self.ids, self.h_ids), (self.pos, self.h_pos), (self.slots, self.h_slots),
                         (self.ctx, self.h_ctx)):
            dst[:nb].copy_(src[:nb], non_blocking=True)
        width = max(len(c.block_ids) for c in decodes)   # entries past a row's blocks are never read
        self.tables[:nb, :width].copy_(self.h_tables[:nb, :width], non_blocking=True)
        self.num_replays += 1
        if not self.capture:
            return self._forward(nb)[:n]
        self.graphs[nb].replay()
        return self.logits[nb][:n]


"""Executes one step decision: KV transfers, the forward pass over the paged cache, sampling."""

from __future__ import annotations

import torch

from tokenyard.engine.kv_store import KVStore
from tokenyard.engine.sampler import SampleState, make_sample_state, sample
from tokenyard.engine.swap_worker import SwapWorker
from tokenyard.model.config import ModelConfig
from tokenyard.model.llama import AttentionMetadata, LlamaModel, LlamaWeights, PrefillChunk
from tokenyard.outputs import TokenLogprob
from tokenyard.sampling_params import SamplingParams
from tokenyard.sched.output import ScheduledChunk, SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.block_size = block_size
        weights = LlamaWeights(cfg, state_dict, dtype, device)
        self.model = LlamaModel(cfg, weights, max_model_len, device)
        self.store = KVStore(cfg, num_blocks=num_blocks, num_host_blocks=num_host_blocks, block_size=block_size,
                             device=device, dtype=dtype)
        self.k_cache, self.v_cache = self.store.k_cache, self.store.v_cache
        self.swap_worker = SwapWorker(self.store)
        self.states: dict[str, SampleState] = {}

    def add_request(self, request_id: str, params: SamplingParams, stop_token_ids: tuple[int, ...] = (),
                    prompt_token_ids: list[int] | None = None) -> None:
        self.states[request_id] = make_sample_state(params, self.device, stop_token_ids, prompt_token_ids,
                                                    self.cfg.vocab_size)

    def remove_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)

    # ------------------------------------------------------------------ execution
    def execute(self, out: SchedulerOutput) -> dict[str, tuple[int, TokenLogprob | None]]:
        self.remove_requests(out.finished)
        self._start_transfers(out)
        if not out.chunks:
            return {}
        decodes = [c for c in out.chunks if c.num_tokens == 1]
        prefills = [c for c in out.chunks if c.num_tokens > 1]
        input_ids, positions, meta, rows, sampled = self._prepare(decodes, prefills)
        logits = self.model.forward(input_ids, positions, meta, self.k_cache, self.v_cache, rows)
        if not sampled:
            return {}
        tokens, logprobs = sample(logits, [self.states[c.request_id] for c in sampled])
        return {c.request_id: (t, lp) for c, t, lp in zip(sampled, tokens, logprobs)}

    def _prepare(self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk]):
        bs = self.block_size
        dev = self.device
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        sampled: list[ScheduledChunk] = []
        for c in decodes:
            p = c.start_pos
            if c.sample:
                rows.append(len(ids))
                sampled.append(c)
            ids.append(c.token_ids[0])
            pos.append(p)
            slots.append(c.block_ids[p // bs] * bs + p % bs)
        prefill_meta: list[PrefillChunk] = []
        for c in prefills:
            q_start = len(ids)
            n = c.num_tokens
            ids.extend(c.token_ids)
            rng = range(c.start_pos, c.start_pos + n)
            pos.extend(rng)
            bids = c.block_ids
            slots.extend(bids[p // bs] * bs + p % bs for p in rng)
            if c.sample:
                rows.append(len(ids) - 1)
                sampled.append(c)
            mask = None
            block_ids = None
            if c.start_pos > 0:
                kv_len = c.start_pos + n
                q_pos = torch.arange(c.start_pos, kv_len)
                mask = torch.arange(kv_len)[None, :] <= q_pos[:, None]
                mask = mask.to(dev)
                block_ids = torch.tensor(bids[: -(-kv_len // bs)], device=dev)
            prefill_meta.append(PrefillChunk(q_start, n, c.start_pos, block_ids, mask))
        nd = len(decodes)
        block_tables = decode_mask = ctx = None
        if nd:
            width = max(len(c.block_ids) for c in decodes)
            table = [c.block_ids + [0] * (width - len(c.block_ids)) for c in decodes]
            block_tables = torch.tensor(table, dtype=torch.long, device=dev)
            ctx = torch.tensor([c.start_pos + 1 for c in decodes], dtype=torch.long, device=dev)
            if not self.model.use_kernel:  # the kernel reads context_lens; only the SDPA fallback needs a mask
                decode_mask = (torch.arange(width * bs, device=dev)[None, :] < ctx[:, None])[:, None, None, :]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=nd,
            decode_block_tables=block_tables,
            decode_mask=decode_mask,
            decode_context_lens=ctx,
            prefills=prefill_meta,
        )
        return (
            torch.tensor(ids, device=dev),
            torch.tensor(pos, device=dev),
            meta,
            torch.tensor(rows, dtype=torch.long, device=dev),
            sampled,
        )

    def _start_transfers(self, out: SchedulerOutput) -> None:
        """Blocking copies first, in decision order (a later decision may reuse blocks an earlier one released),
        then the overlapped ones go to the swap worker. Transfers of earlier steps the forward needs: waited for."""
        if out.wait_for:
            self.swap_worker.wait(out.wait_for)
        for t in out.transfers:
            if t.blocking:
                self.store.copy(t.segments, t.to_host)
        for t in out.transfers:
            if not t.blocking:
                self.swap_worker.submit(t.transfer_id, t.segments, t.to_host)

    def poll_transfers(self, block: bool = False) -> list[int]:
        """Overlapped transfers that have landed since the last poll (``block``: wait for one, if any runs)."""
        return self.swap_worker.poll(block)

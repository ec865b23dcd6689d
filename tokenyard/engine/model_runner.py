"""Executes one step decision: KV transfers, the forward pass over the paged cache, sampling."""

from __future__ import annotations

import torch

from tokenyard.engine.cuda_graphs import DecodeGraphs
from tokenyard.engine.kv_store import KVStore
from tokenyard.engine.sampler import SampleState, make_sample_state, sample
from tokenyard.engine.swap_worker import SwapWorker
from tokenyard.model.config import ModelConfig
from tokenyard.model.llama import AttentionMetadata, LlamaModel, LlamaWeights, PrefillChunk
from tokenyard.outputs import TokenLogprob
from tokenyard.sampling_params import SamplingParams
from tokenyard.sched.output import ScheduledChunk, SchedulerOutput


class ModelRunner:
    """Holds the weights, the KV tensors and the per-request sampling state.

    Built in two steps, because on CUDA the KV cache is sized from what the weights and a profiling pass
    leave free: ``ModelRunner(...)`` loads the weights, then ``allocate_kv(...)`` makes the cache (and the
    decode CUDA graphs, which address it)."""

    def __init__(
        self,
        cfg: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        block_size: int,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        weights = LlamaWeights(cfg, state_dict, dtype, device)
        self.model = LlamaModel(cfg, weights, max_model_len, device)
        self.states: dict[str, SampleState] = {}
        self.graphs: DecodeGraphs | None = None

    def allocate_kv(self, num_blocks: int, num_host_blocks: int) -> None:
        self.store = KVStore(self.cfg, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
                             block_size=self.block_size, device=self.device, dtype=self.dtype)
        self.k_cache, self.v_cache = self.store.k_cache, self.store.v_cache
        self.swap_worker = SwapWorker(self.store)

    def enable_decode_graphs(self, max_batch: int, capture: bool = True) -> None:
        """Decode-only steps of up to ``max_batch`` requests go through ``DecodeGraphs`` (captured CUDA graphs;
        ``capture=False``: the same padded path run eagerly, for tests on CPU)."""
        self.graphs = DecodeGraphs(self.model, self.k_cache, self.v_cache, max_batch=max_batch,
                                   max_model_len=self.max_model_len, block_size=self.block_size,
                                   scratch_block=self.store.scratch_block, capture=capture)

    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int, num_rows: int) -> int:
        """CUDA: peak memory torch holds while one prefill step of ``num_tokens`` tokens (the token budget)
        runs with ``num_rows`` logits rows, weights included. The step writes its KV to a throwaway block."""
        dev = self.device
        probe = KVStore(self.cfg, num_blocks=1, num_host_blocks=0, block_size=self.block_size, device=dev,
                        dtype=self.dtype)
        n = max(1, min(num_tokens, self.max_model_len))
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        meta = AttentionMetadata.whole_prompt(torch.zeros(n, dtype=torch.long, device=dev))
        rows = torch.arange(n - min(n, num_rows), n, device=dev)
        logits = self.model.forward(torch.zeros(n, dtype=torch.long, device=dev),
                                    torch.arange(n, device=dev), meta, probe.k_cache, probe.v_cache, rows)
        torch.log_softmax(logits.float(), dim=-1)   # the sampler's fp32 work on the logits
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del probe, logits
        torch.cuda.empty_cache()
        return peak

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
        if self.graphs is not None and not prefills and len(decodes) <= self.graphs.max_batch:
            logits = self.graphs.run(decodes)
            sampled = [c for c in decodes if c.sample]
            if len(sampled) < len(decodes):   # a 1-token prefill chunk that is not a prompt's last
                keep = [i for i, c in enumerate(decodes) if c.sample]
                logits = logits[torch.tensor(keep, device=logits.device)]
        else:
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
            if self.model.attn_backend == "sdpa":  # the kernels read context_lens; only SDPA needs a mask
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

"""The unified token-budget scheduler (Sarathi-Serve / vLLM v1 style). Pure Python, no torch.

There is no prefill phase and no decode phase. Each step hands out at most ``max_num_batched_tokens``:
running decodes first (one token each, so they never stall behind a prompt), then running partial
prefills (a chunk of what is left), then swapped requests coming back, then waiting requests in policy
order. When blocks run out, the least urgent running request is preempted by swap or by recompute.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tokenyard.kv.manager import KVCacheManager, cdiv
from tokenyard.sched.output import ScheduledChunk, SchedulerOutput
from tokenyard.sched.policy import make_policy
from tokenyard.sched.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 256
    scheduling_policy: str = "fcfs"       # "fcfs" | "priority"
    preemption_mode: str = "recompute"    # "recompute" | "swap"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        make_policy(self.scheduling_policy)  # validates the name


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.policy = make_policy(config.scheduling_policy)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []   # sorted by policy key
        self.swapped: list[Request] = []   # sorted by policy key
        self.running: list[Request] = []
        self._seq = itertools.count()
        self._order: dict[str, int] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # ----------------------------------------------------------------- queue helpers
    def _key(self, req: Request) -> tuple:
        return self.policy.key(req, self._order[req.request_id])

    def _insort(self, queue: list[Request], req: Request) -> None:
        bisect.insort(queue, req, key=self._key)

    # ----------------------------------------------------------------- public API
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        total = req.num_prompt_tokens + req.max_tokens
        if req.max_model_len is not None:
            total = min(total, req.max_model_len)
        if cdiv(total, self.kv.block_size) > self.kv.pool.num_blocks:
            raise ValueError(
                f"request needs up to {total} tokens of KV cache but the pool holds only "
                f"{self.kv.pool.num_blocks * self.kv.block_size}: lower max_tokens or raise num_kv_blocks"
            )
        self._order[req.request_id] = next(self._seq)
        self.requests[req.request_id] = req
        req.status = RequestStatus.WAITING
        self._insort(self.waiting, req)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (or abort) requests wherever they are; their blocks are freed at once."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.status.finished:
                continue
            self._remove_from_queue(req)
            self._finish(req, status)
            done.append(req)
        return done

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ----------------------------------------------------------------- the step decision
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens

        if self.policy.preempts_for_waiting:
            self._preempt_for_urgent_waiting(out, budget)
        urgent_preemptions = len(out.preempted)

        # 1. Running requests: decodes first, then partial prefills, each in policy order.
        order = sorted(self.running, key=lambda r: (r.is_prefilling, self._key(r)))
        i = 0
        while i < len(order) and budget > 0:
            req = order[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n):
                self._schedule_chunk(out, req, n)
                budget -= n
                i += 1
                continue
            # Out of blocks: preempt the least urgent of those not yet scheduled (maybe req itself).
            victim = max(order[i:], key=self._key)
            order.remove(victim)
            self._preempt(victim, out)

        # 2./3. Swapped requests come back, then waiting ones are admitted, unless this step had to
        # preempt for room (admitting now would only thrash).
        if len(out.preempted) == urgent_preemptions:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        if self.policy.merge_swapped_and_waiting:
            candidates = sorted(self.swapped + self.waiting, key=self._key)
        else:
            candidates = self.swapped + self.waiting
        for req in candidates:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            if req.status is RequestStatus.SWAPPED:
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                held = len(self.kv.host_blocks.get(req.request_id, ()))
                extra = cdiv(req.num_computed_tokens + n, self.kv.block_size) - held
                if not self.kv.can_swap_in(req.request_id, extra):
                    return
                out.swap_in.extend(self.kv.swap_in(req.request_id))
                ok = self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n)
                assert ok, "swap-in capacity was checked"
                self.swapped.remove(req)
            else:
                hits, num_computed = self.kv.get_computed_blocks(req.request_id, req.all_token_ids)
                n = min(req.num_tokens - num_computed, budget)
                if not self.kv.allocate_slots(req.request_id, num_computed + n, hits):
                    return
                req.num_computed_tokens = num_computed
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_computed
                self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._schedule_chunk(out, req, n)
            budget -= n

    def _preempt_for_urgent_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Priority policy: a waiting request more urgent than a running one may take its place."""
        if not self.waiting or not self.running:
            return
        head = self.waiting[0]
        head_key = self._key(head)
        need = cdiv(min(head.num_tokens, budget), self.kv.block_size)
        while self.running and (
            self.kv.num_free_blocks < need or len(self.running) >= self.config.max_num_seqs
        ):
            victim = max(self.running, key=self._key)
            if self._key(victim) <= head_key:
                return
            self._preempt(victim, out)

    def _schedule_chunk(self, out: SchedulerOutput, req: Request, n: int) -> None:
        start = req.num_computed_tokens
        out.chunks.append(
            ScheduledChunk(
                request_id=req.request_id,
                token_ids=req.all_token_ids[start:start + n],
                start_pos=start,
                block_ids=self.kv.block_ids(req.request_id),
                sample=start + n == req.num_tokens,
            )
        )
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req.request_id)
        if self.config.preemption_mode == "swap" and self.kv.can_swap_out(req.request_id):
            out.swap_out.extend(self.kv.swap_out(req.request_id))
            req.status = RequestStatus.SWAPPED
            self._insort(self.swapped, req)
        else:
            self.kv.free(req.request_id, forget_hashes=False)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
            self._insort(self.waiting, req)

    # ----------------------------------------------------------------- after the step
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish by length/stop id. Returns touched requests."""
        touched = []
        for chunk in out.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
            if chunk.sample:
                req.append_output_token(sampled[req.request_id])
                touched.append(req)
                status = req.check_stop()
                if status is not None:
                    self.running.remove(req)
                    self._finish(req, status)
        return touched

    def _remove_from_queue(self, req: Request) -> None:
        queue = {
            RequestStatus.WAITING: self.waiting,
            RequestStatus.RUNNING: self.running,
            RequestStatus.SWAPPED: self.swapped,
        }[req.status]
        queue.remove(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req.request_id)
        del self.requests[req.request_id]
        del self._order[req.request_id]
        self._finished_ids.append(req.request_id)

    # ----------------------------------------------------------------- checks
    def check_invariants(self) -> None:
        """Every live request in exactly one queue with the blocks its state implies; KV pool consistent."""
        self.kv.check_invariants()
        bs = self.kv.block_size
        seen: set[str] = set()
        for queue, status in (
            (self.waiting, RequestStatus.WAITING),
            (self.running, RequestStatus.RUNNING),
            (self.swapped, RequestStatus.SWAPPED),
        ):
            for req in queue:
                rid = req.request_id
                assert rid not in seen, f"request {rid} in two queues"
                seen.add(rid)
                assert req.status is status, f"request {rid} is {req.status} but queued as {status}"
                dev = len(self.kv.req_blocks.get(rid, ()))
                host = len(self.kv.host_blocks.get(rid, ()))
                want = cdiv(req.num_computed_tokens, bs)
                if status is RequestStatus.WAITING:
                    assert dev == host == 0 and req.num_computed_tokens == 0, f"waiting {rid} holds KV"
                elif status is RequestStatus.RUNNING:
                    assert dev == want and host == 0, f"running {rid}: {dev} blocks, {want} expected"
                else:
                    assert host == want and dev == 0, f"swapped {rid}: {host} host blocks, {want} expected"
        assert seen == set(self.requests), "a live request is in no queue, or a finished one still queued"
        owners = set(self.kv.req_blocks) | set(self.kv.host_blocks)
        assert owners <= seen, f"finished requests still hold blocks: {owners - seen}"
        assert len(self.running) <= self.config.max_num_seqs

    def check_output(self, out: SchedulerOutput) -> None:
        assert out.num_batched_tokens <= self.config.max_num_batched_tokens, "token budget exceeded"
        ids = [c.request_id for c in out.chunks]
        assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
        for c in out.chunks:
            assert c.num_tokens >= 1
            assert len(c.block_ids) * self.kv.block_size >= c.start_pos + c.num_tokens, "chunk lacks blocks"

"""The unified token-budget scheduler (Sarathi-Serve / vLLM v1 style). Pure Python, no torch.

There is no prefill phase and no decode phase. Each step hands out at most ``max_num_batched_tokens``:
running decodes first (one token each, so they never stall behind a prompt), then prefill work: running
partial prefills and queued (waiting or swapped-out) requests, merged in the policy's order of urgency, so
a long, unimportant prompt mid-prefill does not hold the budget against an urgent newcomer.

Who waits and who is preempted is the policy's call (``tokenyard.sched.policy``):

- Out of blocks, the victim is the least urgent of *all* running requests, also one already given work in
  this step: that work is rolled back (its budget, its new blocks, its accounting), as vLLM v1 does.
- A queued request that does not fit may preempt the least urgent running request if the policy allows it
  (``priority``: a worse priority; ``vtc+priority``: a worse band) and that one is less urgent.
- Once a step has preempted anyone, it admits only requests more urgent than everyone it preempted, so no
  request preempted in a step is more urgent than one that kept its blocks (and admission does not thrash).

KV in flight (``swap_overlap``, FastSwitch): a swap-out or a swap-in is a transfer that the model runner copies
beside the forward pass; the request sits in SWAPPING_OUT / SWAPPING_IN, in no queue, until the runner
reports the transfer done (``update_from_output``). A swapping-in request computes from the step after its copy
lands, so the rest of the batch never waits for it. A swap-out's device blocks stay pinned until it lands;
when a step needs those blocks now, it forces the transfer (the runner finishes that copy before the forward
pass) rather than preempt anyone else. Without overlap every transfer completes at once, copied before the
step's forward pass, as a synchronous swap does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from tokenyard.invariants import InvariantError, require
from tokenyard.kv.manager import KVCacheManager, KVTransfer, cdiv
from tokenyard.sampling_params import InvalidParameterError
from tokenyard.sched.accounting import Charge, ServiceLedger
from tokenyard.sched.output import ScheduledChunk, SchedulerOutput
from tokenyard.sched.policies import check_policy_name, make_policy
from tokenyard.sched.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 256
    scheduling_policy: str = "fcfs"       # "fcfs" | "priority" | "vtc" | "vtc+priority"
    preemption_mode: str = "recompute"    # "recompute" | "swap"
    swap_overlap: bool = True             # copy swaps beside the forward pass (KV-in-flight states)
    vtc_w_p: float = 1.0                  # service per prompt token
    vtc_w_q: float = 2.0                  # service per output token
    tenant_weights: Mapping[str, float] = field(default_factory=dict)  # others weigh 1

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        check_policy_name(self.scheduling_policy)


def admission_tokens(req: Request, num_computed: int, overlap: bool, budget: int) -> tuple[int, int]:
    """(tokens of the chunk scheduled at admission, tokens to make room for). A copy that overlaps the forward
    pass schedules nothing now, but room is still made for the request's next token: admitted without it, a
    request whose copy lands could not get a block for that token and would preempt itself, again and again
    (with reused host copies, in no time: found by the simulator's property test as a run that never ended)."""
    if overlap:
        return 0, num_computed + min(1, req.num_tokens - num_computed)
    n = min(req.num_tokens - num_computed, budget)
    return n, num_computed + n


@dataclass
class _Step:
    """One step's decisions in the making."""

    out: SchedulerOutput
    budget: int
    scheduled: dict[str, tuple[ScheduledChunk, Charge | None]] = field(default_factory=dict)
    admitted: set[str] = field(default_factory=set)
    most_urgent_preempted: tuple | None = None
    # Swapped out by force this step: queued again only once the step is decided, so no request more urgent
    # than the head being admitted appears in the queue mid-step (admission order stays the policy's order).
    landed_out: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: the time the scheduler stamps on requests (first scheduled). The engine passes none (the
        monotonic clock); a simulator passes its own virtual clock, so no wall time leaks into a simulation."""
        self.config = config
        self.kv = kv
        self.clock = clock
        self.ledger = ServiceLedger(config.vtc_w_p, config.vtc_w_q, config.tenant_weights)
        self.policy = make_policy(config.scheduling_policy, self.ledger)
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self.in_flight: dict[int, Request] = {}   # transfer id -> its SWAPPING_OUT / SWAPPING_IN request
        # Running requests frozen for a live migration's last stage: they keep their blocks, are not scheduled.
        self.detached: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        # Preempted this step -> the urgency each had (for tests and the invariant "no inversion").
        self.last_preempted: dict[str, tuple] = {}

    # ----------------------------------------------------------------- queues (the policy owns them)
    @property
    def waiting(self) -> list[Request]:
        return [r for r in self.policy.queued() if r.status is RequestStatus.WAITING]

    @property
    def swapped(self) -> list[Request]:
        return [r for r in self.policy.queued() if r.status is RequestStatus.SWAPPED]

    # ----------------------------------------------------------------- public API
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise InvalidParameterError("request_id", f"request_id {req.request_id!r} is already in use")
        total = req.num_prompt_tokens + req.max_tokens
        if req.max_model_len is not None:
            total = min(total, req.max_model_len)
        if cdiv(total, self.kv.block_size) > self.kv.pool.num_blocks:
            raise InvalidParameterError(
                "max_tokens", f"request needs up to {total} tokens of KV cache but the pool holds only "
                f"{self.kv.pool.num_blocks * self.kv.block_size}: lower max_tokens or raise num_kv_blocks"
            )
        self.requests[req.request_id] = req
        req.status = RequestStatus.WAITING
        self.policy.register(req)
        self.policy.push(req, arrival=True)

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a live request's priority; it counts from the next step. False if no such live request."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.policy.set_priority(req, priority)
        return True

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
        """Requests to schedule (a request frozen for migration is not one: nothing runs it here)."""
        return len(self.requests) > len(self.detached)

    # ----------------------------------------------------------------- live migration
    def detach(self, request_id: str) -> Request | None:
        """Freeze a running request for a migration's last stage (call between steps): it keeps its blocks and
        its place in ``requests`` but is not scheduled until :meth:`reattach` or :meth:`release`. None if it is
        not running (finished, queued, preempted meanwhile)."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.RUNNING or request_id in self.detached:
            return None
        self.running.remove(req)
        self.detached[request_id] = req
        return req

    def reattach(self, request_id: str) -> bool:
        """The migration failed: the frozen request runs here again. False if it was aborted meanwhile."""
        req = self.detached.pop(request_id, None)
        if req is None:
            return False
        self.running.append(req)
        return True

    def release(self, request_id: str) -> bool:
        """The migration committed: forget the frozen request and free its blocks (no output: it lives on)."""
        req = self.detached.pop(request_id, None)
        if req is None:
            return False
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return True

    def adopt(self, req: Request, reservation: str) -> bool:
        """A request migrated in, its KV already written into ``reservation``'s blocks: it runs from the next
        step. False (and no change) when every seat is taken or its id is live here."""
        if self._seats_taken >= self.config.max_num_seqs or req.request_id in self.requests:
            return False
        self.kv.adopt(reservation, req.request_id, req.all_token_ids, req.num_computed_tokens, req.cache_salt)
        self.requests[req.request_id] = req
        req.status = RequestStatus.RUNNING
        self.policy.register(req)
        self.ledger.adopt(req)
        self.running.append(req)
        return True

    def has_transfers_in_flight(self) -> bool:
        return bool(self.kv.transfers)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ----------------------------------------------------------------- the step decision
    def schedule(self) -> SchedulerOutput:
        st = _Step(SchedulerOutput(finished=self._finished_ids), self.config.max_num_batched_tokens)
        self._finished_ids = []
        self.last_preempted = {}
        self.policy.begin_step()
        key = self.policy.urgency

        # 1. Decodes, most urgent first.
        decodes = sorted((r for r in self.running if not r.is_prefilling), key=key)
        if not self._schedule_decodes(st, decodes):
            for req in decodes:
                self._schedule_running(st, req)

        # 2. Prefill work: running partial prefills and queued requests, merged by urgency.
        prefills = sorted((r for r in self.running if r.is_prefilling), key=key)
        i = 0
        admitting = True
        while st.budget > 0:
            while i < len(prefills) and prefills[i].status is not RequestStatus.RUNNING:
                i += 1  # preempted meanwhile
            nxt = prefills[i] if i < len(prefills) else None
            cand = self.policy.peek() if admitting else None
            if nxt is None and cand is None:
                break
            if nxt is not None and (cand is None or key(nxt) < key(cand)):
                self._schedule_running(st, nxt)
                i += 1
            elif not self._try_admit(st, cand):
                admitting = False  # the head does not fit: nothing behind it jumps the queue
        for req in st.landed_out:
            self.policy.push(req)
        return st.out

    @property
    def _seats_taken(self) -> int:
        """Running requests, those swapping in (they run once their copy lands) and those frozen for a migration
        (they run here again if it fails)."""
        return (len(self.running) + len(self.detached)
                + sum(r.status is RequestStatus.SWAPPING_IN for r in self.in_flight.values()))

    def _issue(self, st: _Step, t: KVTransfer, req: Request, overlap: bool) -> None:
        """Hand a transfer to this step's output: in flight (``overlap``) or completed now and copied before
        the forward pass."""
        st.out.transfers.append(t)
        if overlap:
            self.in_flight[t.transfer_id] = req
        else:
            t.blocking = True
            self.kv.complete(t.transfer_id)

    def _force_swap_outs(self, st: _Step) -> bool:
        """Blocks are needed now: complete every swap-out in flight (the runner finishes those copies before
        this step's forward pass). False if there was none."""
        forced = [tid for tid, t in self.kv.transfers.items() if t.to_host]
        for tid in forced:
            t = self.kv.complete(tid)
            if t in st.out.transfers:
                t.blocking = True
            else:
                st.out.wait_for.append(tid)
            self._landed(self.in_flight.pop(tid, None), t, st.landed_out)
        return bool(forced)

    def _landed(self, req: Request | None, t: KVTransfer, queue_later: list[Request] | None = None) -> None:
        """A transfer of ``req`` has completed: it moves on to SWAPPED (queued now, or appended to
        ``queue_later``), or RUNNING (None: it was aborted)."""
        if req is None:
            return
        if t.to_host:
            req.status = RequestStatus.SWAPPED
            if queue_later is None:
                self.policy.push(req)
            else:
                queue_later.append(req)
        else:
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _schedule_decodes(self, st: _Step, decodes: list[Request]) -> bool:
        """Every decode its token at once where none can fall short: the budget covers them all and the free
        blocks cover every one that crosses into a new block, so one at a time (``_schedule_running``) would give
        each its token in this order and preempt nobody. False: nothing done (the general path decides)."""
        if len(decodes) > st.budget:
            return False
        kv = self.kv
        bs, held = kv.block_size, kv.req_blocks
        crossing = 0
        for r in decodes:
            computed = r.num_computed_tokens
            blocks = held.get(r.request_id)
            if blocks is None or len(r.all_token_ids) - computed != 1:
                return False
            if computed >= len(blocks) * bs:   # its next token starts a block
                crossing += 1
        if crossing > kv.pool.num_free_blocks:
            return False
        for r in decodes:
            if crossing and r.num_computed_tokens >= len(held[r.request_id]) * bs:
                kv.append_block(r.request_id)
            self._add_chunk(st, r, 1)
        return True

    def _schedule_running(self, st: _Step, req: Request) -> None:
        """Give a running request its next chunk, preempting the least urgent running request for blocks."""
        if req.status is not RequestStatus.RUNNING or st.budget <= 0:
            return
        n = min(req.num_tokens - req.num_computed_tokens, st.budget)
        while not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n):
            if self._force_swap_outs(st):
                continue
            victim = max((r for r in self.running if r.request_id not in st.admitted), key=self.policy.urgency)
            self._preempt(st, victim)
            if victim is req:
                return
        self._add_chunk(st, req, n)

    def _try_admit(self, st: _Step, req: Request) -> bool:
        """Admit the queued request ``req`` (swap it in, or start it after its prefix-cache hit). False: it waits."""
        key = self.policy.urgency
        if st.most_urgent_preempted is not None and not key(req) < st.most_urgent_preempted:
            return False
        swapped = req.status is RequestStatus.SWAPPED
        host_hits: list = []
        if swapped:
            hits, num_computed = self.kv.swapped_device_hits(req.request_id), req.num_computed_tokens
        else:
            hits, num_computed = self.kv.get_computed_blocks(req.request_id, req.all_token_ids, req.cache_salt)
            host_hits = self.kv.get_host_hits(req.request_id, req.all_token_ids, len(hits), req.cache_salt)
        dev_computed = num_computed
        num_computed += len(host_hits) * self.kv.block_size
        overlap = self.config.swap_overlap and (swapped or bool(host_hits))
        # Pinned while this admission preempts: a victim's swap-out must not take (and overwrite) them.
        self.kv.host_pool.touch(host_hits)
        # Sized once, before making room: a victim's rolled-back chunk returns budget, and room is made for this n.
        n, room = admission_tokens(req, num_computed, overlap, st.budget)
        try:
            if not self._make_room(st, req, room, hits):
                return False
            self.policy.remove(req)
            if swapped:
                self._issue(st, self.kv.swap_in(req.request_id, hits), req, overlap)
                ok = self.kv.allocate_slots(req.request_id, num_computed + n)
            else:
                ok = self.kv.allocate_slots(req.request_id, dev_computed, hits)
                if host_hits:
                    load = self.kv.load_host_hits(req.request_id, host_hits, req.all_token_ids, req.cache_salt)
                    host_hits = []   # the load holds them now
                    self._issue(st, load, req, overlap)
                ok = ok and self.kv.allocate_slots(req.request_id, num_computed + n)
                self.kv.record_prefix_lookup(req.num_tokens, dev_computed, num_computed - dev_computed)
                req.num_computed_tokens = num_computed
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_computed
        finally:
            self.kv.host_pool.free(host_hits[::-1])
        require(ok, f"admitting {req.request_id}: blocks were checked but could not be allocated")
        st.admitted.add(req.request_id)
        if overlap:
            req.status = RequestStatus.SWAPPING_IN
            return True
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._add_chunk(st, req, n)
        return True

    def _make_room(self, st: _Step, req: Request, num_tokens: int, hits: list) -> bool:
        """Make room for ``req`` holding ``num_tokens`` tokens: force in-flight swap-outs, else preempt what the
        policy allows."""
        if self._fits(req, num_tokens, hits):
            return True
        if self._force_swap_outs(st) and self._fits(req, num_tokens, hits):
            return True
        plan = self._preemption_plan(st, req, num_tokens, hits)
        if plan is None:
            return False  # no preemption the policy allows would make room: preempt nobody for nothing
        for victim in plan:
            self._preempt(st, victim)
        if self._blocks_short(req, num_tokens, hits) > 0:
            self._force_swap_outs(st)   # the victims' blocks are needed now, not once their copies land
        return self._fits(req, num_tokens, hits)

    def _blocks_short(self, req: Request, num_tokens: int, hits: list) -> int:
        """How many more free device blocks admitting ``req`` with ``num_tokens`` tokens would need."""
        if req.status is RequestStatus.SWAPPED:   # hits: its prefix some other request keeps on the device
            return cdiv(num_tokens, self.kv.block_size) - len(hits) - self.kv.pool.num_free_if_touched(hits)
        return self.kv.num_blocks_needed(req.request_id, num_tokens, hits) - self.kv.pool.num_free_if_touched(hits)

    def _fits(self, req: Request, num_tokens: int, hits: list) -> bool:
        return self._seats_taken < self.config.max_num_seqs and self._blocks_short(req, num_tokens, hits) <= 0

    def _preemption_plan(self, st: _Step, req: Request, num_tokens: int, hits: list) -> list[Request] | None:
        """The least urgent running requests whose preemption the policy allows and that would make room for
        queued ``req``, least urgent first; None if even all of them would not."""
        key = self.policy.urgency
        short = self._blocks_short(req, num_tokens, hits)
        seats = self._seats_taken - self.config.max_num_seqs + 1
        hit_ids = {b.block_id for b in hits}
        dropped: dict[int, int] = {}   # block id -> references the plan drops
        plan: list[Request] = []
        for victim in sorted((r for r in self.running if r.request_id not in st.admitted), key=key, reverse=True):
            if short <= 0 and seats <= 0:
                return plan
            if not (key(victim) > key(req) and self.policy.may_preempt(req, victim)):
                return None
            plan.append(victim)
            seats -= 1
            # A block comes free once the plan drops all its references (a prefix block shared by victims frees
            # with the last of them; a swap-out is forced to land at once); one of req's own prefix hits does
            # not count, req takes it back.
            for b in self.kv.req_blocks.get(victim.request_id, ()):
                n = dropped[b.block_id] = dropped.get(b.block_id, 0) + 1
                if n == b.ref_cnt and b.block_id not in hit_ids:
                    short -= 1
        return plan if short <= 0 and seats <= 0 else None

    def _add_chunk(self, st: _Step, req: Request, n: int) -> None:
        start = req.num_computed_tokens
        sample = start + n == req.num_tokens
        chunk = ScheduledChunk(req.request_id, req.all_token_ids[start:start + n], start,
                               self.kv.block_ids(req.request_id), sample)
        st.out.chunks.append(chunk)
        st.budget -= n
        st.scheduled[req.request_id] = (chunk, self.policy.charge(req, start, n, sample))
        if req.first_scheduled_time is None:
            req.first_scheduled_time = self.clock()

    def _preempt(self, st: _Step, req: Request) -> None:
        """Preempt a running request, first rolling back any work this step gave it."""
        urgency = self.policy.urgency(req)
        entry = st.scheduled.pop(req.request_id, None)
        if entry is not None:
            chunk, charge = entry
            st.out.chunks.remove(chunk)
            st.budget += chunk.num_tokens
            self.policy.refund(req, charge)
        self.kv.trim(req.request_id, req.num_computed_tokens)
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        st.out.preempted.append(req.request_id)
        self.last_preempted[req.request_id] = urgency
        if st.most_urgent_preempted is None or urgency < st.most_urgent_preempted:
            st.most_urgent_preempted = urgency
        if self.config.preemption_mode == "swap" and self.kv.can_swap_out(req.request_id):
            t = self.kv.swap_out(req.request_id, req.all_token_ids, req.num_computed_tokens, req.cache_salt)
            req.status = RequestStatus.SWAPPING_OUT
            self._issue(st, t, req, self.config.swap_overlap)
            if not self.config.swap_overlap:
                self._landed(req, t)
        else:
            self.kv.free(req.request_id, forget_hashes=False)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
            self.policy.push(req)

    # ----------------------------------------------------------------- after the step
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int],
                           transfers_done: Iterable[int] = ()) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish by length/stop id; land the transfers the
        runner reports done (any order, any delay). Returns touched requests."""
        self.complete_transfers(transfers_done)
        touched = []
        for chunk in out.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens, req.cache_salt)
            if chunk.sample:
                req.append_output_token(sampled[req.request_id])
                touched.append(req)
                status = req.check_stop()
                if status is not None:
                    self.running.remove(req)
                    self._finish(req, status)
        return touched

    def complete_transfers(self, transfer_ids: Iterable[int]) -> None:
        """The runner reports these transfers landed (ids already completed by force are ignored)."""
        for tid in transfer_ids:
            if tid in self.kv.transfers:
                self._landed(self.in_flight.pop(tid, None), self.kv.complete(tid))

    def _remove_from_queue(self, req: Request) -> None:
        if self.detached.pop(req.request_id, None) is not None:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status in (RequestStatus.SWAPPING_OUT, RequestStatus.SWAPPING_IN):
            # Its transfer stays in flight (its blocks pinned) until the runner reports it; then nobody lands.
            for tid, r in list(self.in_flight.items()):
                if r is req:
                    del self.in_flight[tid]
        else:
            self.policy.remove(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req.request_id)
        del self.requests[req.request_id]
        self.policy.forget(req)
        self._finished_ids.append(req.request_id)

    # ----------------------------------------------------------------- checks
    def check_invariants(self) -> None:
        """Every live request in exactly one place with the blocks its state implies; KV pool and queues consistent.

        Raises :class:`tokenyard.invariants.InvariantError`. Pure bookkeeping, linear in requests and blocks:
        cheap enough to run after every step in tests and whenever the engine goes idle in production.
        """
        self.kv.check_invariants()
        self.policy.check()
        bs = self.kv.block_size
        seen: set[str] = set()
        running_ids = {r.request_id for r in self.running}
        in_flight = {r.request_id: r for r in self.in_flight.values()}
        require(len(in_flight) == len(self.in_flight), "a request has two transfers in flight")
        for tid, req in self.in_flight.items():
            t = self.kv.transfers.get(tid)
            require(t is not None and t.request_id == req.request_id, f"transfer {tid} of {req.request_id} lost")
            want_status = RequestStatus.SWAPPING_OUT if t.to_host else RequestStatus.SWAPPING_IN
            require(req.status is want_status, f"{req.request_id} is {req.status.value} during a transfer")
        for req in [*self.running, *self.policy.queued(), *self.in_flight.values(), *self.detached.values()]:
            rid = req.request_id
            require(rid not in seen, f"request {rid} is both running and queued, or queued twice")
            seen.add(rid)
            dev = len(self.kv.req_blocks.get(rid, ()))
            host = len(self.kv.host_blocks.get(rid, ()))
            want = cdiv(req.num_computed_tokens, bs)
            if req.status is RequestStatus.WAITING:
                require(dev == host == 0 and req.num_computed_tokens == 0, f"waiting {rid} holds KV")
            elif req.status is RequestStatus.RUNNING:
                require(rid in running_ids or rid in self.detached, f"request {rid} is RUNNING but queued")
                require(dev == want and host == 0, f"running {rid}: {dev} blocks, {want} expected")
            elif req.status in (RequestStatus.SWAPPED, RequestStatus.SWAPPING_OUT):
                require(host == want and dev == 0, f"swapped {rid}: {host} host blocks, {want} expected")
            elif req.status is RequestStatus.SWAPPING_IN:
                require(dev == want and host == 0, f"swapping-in {rid}: {dev} blocks, {want} expected")
            else:
                raise InvariantError(f"request {rid} is {req.status.value} but still scheduled")
        for req in self.running:
            require(req.status is RequestStatus.RUNNING, f"request {req.request_id} in running is {req.status}")
        require(seen == set(self.requests), "a live request is in no queue, or a finished one still queued")
        owners = set(self.kv.req_blocks) | set(self.kv.host_blocks)
        require(owners <= seen, f"finished requests still hold blocks: {owners - seen}")
        require(self._seats_taken <= self.config.max_num_seqs, "more running requests than max_num_seqs")
        for rid, req in self.detached.items():
            require(req.status is RequestStatus.RUNNING and rid not in running_ids, f"detached {rid} is scheduled")

    def check_output(self, out: SchedulerOutput) -> None:
        """Check one step's decision: within the token budget, no request twice, every chunk backed by blocks."""
        require(out.num_batched_tokens <= self.config.max_num_batched_tokens, "token budget exceeded")
        ids = [c.request_id for c in out.chunks]
        require(len(ids) == len(set(ids)), "a request scheduled twice in one step")
        for c in out.chunks:
            require(c.num_tokens >= 1, f"empty chunk for {c.request_id}")
            require(len(c.block_ids) * self.kv.block_size >= c.start_pos + c.num_tokens,
                    f"chunk of {c.request_id} lacks blocks")
            require(c.request_id not in out.preempted, f"{c.request_id} both scheduled and preempted")

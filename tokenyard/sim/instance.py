"""One simulated engine instance: the real ``Scheduler`` and ``KVCacheManager``, a cost model instead of a model
runner, a virtual clock. Pure Python.

A step is what the engine does: ``schedule()``, the step's time from the cost model (plus the KV copies it must
wait for), then ``update_from_output()`` with a sampled token for every chunk that samples. Overlapped swaps land
when their copy is done (copies run one after another on one copy engine).

**Collapsed decode spans.** After a step that leaves every running request decoding, with no KV in flight and
nothing queued that could start, the following steps are the same decision again until something changes it.
Those steps are run as one span: their times summed step by step with the very expression a step uses, then the
requests advanced in bulk, with the few block allocations and prefix-cache registrations they make replayed in
step order, so the state after the span is the state stepping reaches (``tests/test_sim.py`` checks it on
random workloads). A span runs up to and including the step in which the first request finishes (max_tokens or
the context window; sampled tokens are never stop tokens): that step is the same decision too, and its update
is the scheduler's own ``update_from_output``. It ends earlier, before:

- an arrival (the caller bounds it in time) or a migration touching this instance;
- a block shortage (a step whose allocations exceed the free blocks);
- a queue head that could start: a span with a queued head only runs under ``fcfs`` / ``priority`` (whose head
  does not change), when the head did not fit, may preempt no running request, has no prefix hit a new block
  could evict, and no block the span registers in the prefix cache continues the head's prefix hit;
- more decodes than the token budget, prefill work or KV in flight (none of which is a span).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tokenyard.kv.manager import KVCacheManager
from tokenyard.sched.output import ScheduledChunk, SchedulerOutput
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig, admission_tokens
from tokenyard.sim.cost import CostModel, StepShape

REPEAT_ADD_ARRAY = 200   # from this many additions on, ``repeat_add`` adds with NumPy (faster from ~200)

SAMPLED_TOKEN = 1   # every simulated output token (no request has stop tokens: lengths are max_tokens)


@dataclass
class RequestTimes:
    """When one request arrived and got each token, on the simulation's clock (it moves with a migration)."""

    arrival: float
    token_times: list[float] = field(default_factory=list)   # end of the step that sampled each output token


@dataclass
class InstanceStats:
    steps: int = 0
    span_steps: int = 0            # steps run inside collapsed spans
    spans: int = 0
    busy_s: float = 0.0
    tokens: int = 0


class SimInstance:
    def __init__(self, instance_id: str, sched_config: SchedulerConfig, cost: CostModel, *, num_blocks: int,
                 num_host_blocks: int = 0, enable_prefix_caching: bool = True, block_groups: bool = True,
                 host_cache: bool = True, collapse: bool = True, check_invariants: bool = False,
                 record_tokens: bool = True,
                 on_finish: Callable[[Request, RequestTimes, float], None] | None = None) -> None:
        self.instance_id = instance_id
        self.cost = cost
        self.kv = KVCacheManager(num_blocks, cost.block_size, num_host_blocks, enable_prefix_caching,
                                 block_groups=block_groups, host_cache=host_cache)
        self.now = 0.0
        self.sched = Scheduler(sched_config, self.kv, clock=lambda: self.now)
        self.collapse = collapse
        self.check = check_invariants
        self.record_tokens = record_tokens
        self.on_finish = on_finish
        self.times: dict[str, RequestTimes] = {}
        self.stats = InstanceStats()
        self._in_flight: dict[int, float] = {}   # transfer id -> when its copy is done
        self._copy_free = 0.0
        self._steady = False                      # the last step left a state a span may continue
        self._static_order = sched_config.scheduling_policy in ("fcfs", "priority")

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, req: Request, times: RequestTimes) -> None:
        """Queue a request that arrives at ``req.arrival_time`` (not before this instance's clock). Raises the
        scheduler's InvalidParameterError for one that can never fit."""
        idle = not self.has_work
        self.sched.add_request(req)
        self.times[req.request_id] = times
        self._steady = False
        if idle:
            self.now = max(self.now, req.arrival_time)

    def touch(self) -> None:
        """Something outside changed this instance's state (a migration): the next step is a full one."""
        self._steady = False

    @property
    def has_work(self) -> bool:
        return self.sched.has_unfinished_requests() or bool(self._in_flight)

    # ------------------------------------------------------------------ running
    def run_until(self, limit: float) -> bool:
        """Run every step that starts before ``limit`` (steps start when the previous one ends). False: stopped
        with work left that nothing can run until something arrives."""
        while self.has_work and self.now < limit:
            if self._steady and self._span(limit):
                continue
            if not self._step():
                return False
        return True

    def _step(self) -> bool:
        s = self.sched
        start = self.now
        out = s.schedule()
        if self.check:
            s.check_output(out)
        shape = StepShape.of(out)
        t = start
        # Blocking copies run first (in decision order), then the forward pass waits for the transfers it needs.
        for tr in out.transfers:
            dur = self.cost.swap_time(tr.num_blocks_copied, len(tr.segments))
            if tr.blocking:
                t += dur
            else:
                begin = max(start, self._copy_free)
                self._copy_free = begin + dur
                self._in_flight[tr.transfer_id] = self._copy_free
        for tid in out.wait_for:
            t = max(t, self._in_flight.pop(tid, t))
        if out.chunks:
            end = t + self.cost.step_time(shape)
        elif self._in_flight:
            end = max(t, min(self._in_flight.values()))   # nothing to compute: wait for the first copy to land
        elif t > start:
            end = t
        else:
            self._steady = False
            return False
        landed = [tid for tid, done in self._in_flight.items() if done <= end]
        for tid in landed:
            del self._in_flight[tid]
        sampled = {c.request_id: SAMPLED_TOKEN for c in out.chunks if c.sample}
        self.now = end
        touched = s.update_from_output(out, sampled, landed)
        st = self.stats
        st.steps += 1
        st.busy_s += end - start
        st.tokens += shape.num_tokens
        for req in touched:
            self._emit(req, end)
        if self.check:
            s.check_invariants()
        self._steady = self.collapse and self._is_steady()
        return True

    def _emit(self, req: Request, t: float) -> None:
        times = self.times[req.request_id]
        if self.record_tokens or not times.token_times:
            times.token_times.append(t)
        if req.status.finished:
            self._finished(req, t)

    def _finished(self, req: Request, t: float) -> None:
        times = self.times.pop(req.request_id)
        if not self.record_tokens and req.num_output_tokens > 1:
            times.token_times.append(t)   # first and last token times are always kept
        if self.on_finish is not None:
            self.on_finish(req, times, t)

    # ------------------------------------------------------------------ collapsed spans
    def _is_steady(self) -> bool:
        """Will the next steps be the same decode step again: every running request decoding, no KV in flight, and
        nothing queued that could start? (Whatever the last step did: it may have ended prefills, finished,
        preempted or admitted requests.)"""
        s = self.sched
        running = s.running
        if (not running or self._in_flight or self.kv.transfers or s.detached
                or len(running) > s.config.max_num_batched_tokens):
            return False
        for r in running:
            if r.num_tokens - r.num_computed_tokens != 1:
                return False
        if len(s.policy) == 0:
            return True
        if not self._static_order:
            return False
        head = s.policy.peek()
        if head is None or not self._head_blocked(head, s.config.max_num_batched_tokens - len(running)):
            return False
        key = s.policy.urgency
        kh = key(head)
        return not any(key(r) > kh and s.policy.may_preempt(head, r) for r in running)

    def _head_blocked(self, head: Request, budget_left: int) -> bool:
        """Would the next steps leave the queue head waiting? The admission test of ``Scheduler._try_admit``, read
        only: no seat, or too few free blocks for its first chunk after its prefix hits; and nothing a span does
        can change that answer but a registration (``_span`` checks those)."""
        s, kv = self.sched, self.kv
        if budget_left <= 0 or s._seats_taken >= s.config.max_num_seqs:
            return True
        rid = head.request_id
        swapped = head.status is RequestStatus.SWAPPED
        host: list = []
        if swapped:
            hits, computed = kv.swapped_device_hits(rid), head.num_computed_tokens
        else:
            hits, computed = kv.get_computed_blocks(rid, head.all_token_ids, head.cache_salt)
            host = kv.get_host_hits(rid, head.all_token_ids, len(hits), head.cache_salt)
        if any(b.ref_cnt == 0 for b in hits):
            # A decode's new block may evict one of them, cutting the head's hit short, and a shorter hit can
            # fit where the longer one did not (its chunk is budget-bound): no span while that can happen.
            return False
        computed += len(host) * kv.block_size
        overlap = s.config.swap_overlap and (swapped or bool(host))
        _, room = admission_tokens(head, computed, overlap, budget_left)
        return s._blocks_short(head, room, hits) > 0

    def _span(self, limit: float) -> bool:
        """Run the decode steps that repeat the last one, starting before ``limit``, up to and including the step
        in which the first running request finishes. False: none can run.

        Only the steps where something happens are visited: a request's block allocation (its context reaching a
        block boundary, in the step's schedule) and prefix-cache registration (a block filled, in its update).
        Charges are applied in bulk between them: each tenant's counter gets the same additions, in the same
        order, as stepping makes (a tenant's additions are all alike), so VTC's ordering at the visited steps
        and the counters after the span are exactly stepping's. The finishing step is the same decision again;
        its update (tokens, registrations, finishes, freed blocks) is the scheduler's own ``update_from_output``
        on that decision's chunks."""
        s, kv, bs = self.sched, self.kv, self.kv.block_size
        running = s.running
        n = len(running)
        # Steps up to the first finish, that one included.
        k_fin = min(min(r.max_tokens - r.num_output_tokens,
                        (r.max_model_len - r.num_tokens) if r.max_model_len is not None else 1 << 62)
                    for r in running)
        if k_fin <= 0:
            self._steady = False
            return False
        start = self.now
        ends = self.cost.decode_ends(start, n, sum(r.num_computed_tokens + 1 for r in running), k_fin, limit)
        k = len(ends)
        if k == 0:
            return False
        final = k == k_fin          # the span ends with the finishing step
        kb = k - 1 if final else k   # the steps advanced in bulk (the finishing one goes through the update)
        static = self._static_order
        urgency = s.policy.urgency
        order = sorted(running, key=urgency) if static else running
        comp = {r.request_id: r.num_computed_tokens for r in running}
        by_phase: dict[int, list[Request]] = {}
        for r in order:
            by_phase.setdefault(comp[r.request_id] % bs, []).append(r)
        caching = kv.enable_prefix_caching
        # The visited steps: j = -phase (mod bs) allocates, j = -phase - 1 (mod bs) registers (bulk steps only).
        events: set[int] = {0} if caching and kb else set()
        for ph in by_phase:
            events.update(range((-ph) % bs, k, bs))
            if caching:
                events.update(range((-ph - 1) % bs, kb, bs))
        head = s.policy.peek() if len(s.policy) else None
        head_next_hash = self._head_next_hash(head) if head is not None else None
        for r in running:   # the tokens the bulk steps sample, present before the registrations hash them
            r.all_token_ids.extend([SAMPLED_TOKEN] * kb)
        tenants: dict[str, int] = {}
        for r in running:
            tenants[r.tenant] = tenants.get(r.tenant, 0) + 1
        charged = 0   # steps charged so far
        snap: dict[str, float] = {}
        done = kb
        cut = False   # a shortage or the queue head's hash ended the span: the next step is a full one
        free = kv.pool.num_free_blocks
        for j in sorted(events):
            if not static:   # VTC orders by the counters as step j begins
                if j > charged:
                    snap = self._charge_steps(tenants, j - charged)   # counters before step j - 1's charges
                    charged = j
                s.policy.begin_step()
            alloc = by_phase.get((-j) % bs, ())
            if alloc:
                if len(alloc) > free:
                    done, final, cut = j, False, True
                    break
                if not static:
                    alloc = sorted(alloc, key=urgency)
                for r in alloc:   # each crosses a block boundary: one block, counted free above
                    kv.append_block(r.request_id)
                free -= len(alloc)
            if caching and j < kb:
                # Step 0 registers for every request, as stepping's update does: one just swapped in or adopted
                # has full blocks not registered yet (registered later, a block another copy left free to
                # cache could be taken by it, and the pool would differ from stepping's).
                reg = order if j == 0 else by_phase.get((-j - 1) % bs, ())
                if reg:
                    if not static:
                        reg = sorted(reg, key=urgency)
                    for r in reg:
                        kv.cache_full_blocks(r.request_id, r.all_token_ids, comp[r.request_id] + j + 1, r.cache_salt)
                    if head_next_hash is not None and kv.pool.get_cached_block(head_next_hash) is not None:
                        done, final, cut = j + 1, False, True
                        break
        if done < kb:   # the tokens of the steps not taken
            for r in running:
                del r.all_token_ids[len(r.all_token_ids) - (kb - done):]
        if done == 0 and not final:
            self._steady = False
            return False
        if final:   # the finishing step's decision: every running request's decode, most urgent first
            if not static:
                if done > charged:
                    snap = self._charge_steps(tenants, done - charged)
                    charged = done
                s.policy.begin_step()
                order = sorted(running, key=urgency)
            chunks = [ScheduledChunk(r.request_id, [SAMPLED_TOKEN], comp[r.request_id] + done,
                                     kv.block_ids(r.request_id), True) for r in order]
        steps = done + final
        # VTC's frozen counters after the span: each tenant's before the last step's charges (recorded before a
        # tenant's first charge in a step); the last step's charges are in already when a shortage ended the span.
        before_last = snap if charged == steps else self._charge_steps(tenants, steps - charged)
        if not static and hasattr(s.policy, "_frozen"):
            s.policy.begin_step()
            s.policy._frozen.update(before_last)
        if done:
            for r in running:
                r.num_computed_tokens += done
                r.output_token_ids.extend([SAMPLED_TOKEN] * done)
            if self.record_tokens:
                seg = ends[:done]
                for r in running:
                    self.times[r.request_id].token_times.extend(seg)
            else:   # first token times only: a request whose last prompt token ran as a 1-token chunk samples
                for r in running:   # its first token in the span
                    first = self.times[r.request_id].token_times
                    if not first:
                        first.append(ends[0])
        end = ends[steps - 1]
        self.now = end
        st = self.stats
        st.busy_s += end - start
        st.steps += steps
        st.span_steps += steps
        st.spans += 1
        st.tokens += n * steps
        if final:
            touched = s.update_from_output(SchedulerOutput(chunks), {c.request_id: SAMPLED_TOKEN for c in chunks})
            for req in touched:
                self._emit(req, end)
            self._steady = self.collapse and self._is_steady()
        elif cut:
            self._steady = False
        if self.check:
            s.check_invariants()
        return True

    def _charge_steps(self, tenants: dict[str, int], steps: int) -> dict[str, float]:
        """Charge ``steps`` (>= 1) decode steps, as ``ServiceLedger.charge`` makes them: per tenant, one addition
        per request per step (repeated additions, not a product: the floats must come out as stepping's).
        Returns the tenants' counters as they were before the last step's charges."""
        ledger = self.sched.ledger
        w_q = ledger.w_q
        service, counter, weights = ledger.service, ledger.counter, ledger.tenant_weights
        before_last: dict[str, float] = {}
        for t, m in tenants.items():
            (_, before_last[t]), (service[t], counter[t]) = repeat_add(
                (service[t], counter[t]), (w_q, w_q / weights.get(t, 1.0)), steps * m, m)
        return before_last

    def _head_next_hash(self, head: Request):
        """The hash of the first block of the queue head's prompt that is not in the prefix cache: a span that
        registers it would change what the head needs."""
        kv = self.kv
        if not kv.enable_prefix_caching or head.status is not RequestStatus.WAITING:
            return None
        hits, _ = kv.get_computed_blocks(head.request_id, head.all_token_ids, head.cache_salt)
        hashes = kv._hashes.get(head.request_id, [])
        i = len(hits)
        if i >= min((head.num_tokens - 1) // kv.block_size, len(hashes)):
            return None
        return hashes[i]


def repeat_add(xs: tuple[float, ...], cs: tuple[float, ...], times: int, last: int = 0
               ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each ``xs[i]`` after ``times - last`` and after ``times`` additions of ``cs[i]``, one at a time (not
    ``x + times * c``: the floats must be stepping's). Many additions run as ``np.add.accumulate`` along each
    row, which adds left to right: the same floats."""
    if times < REPEAT_ADD_ARRAY:
        before, after = [], []
        for x, c in zip(xs, cs):
            for _ in range(times - last):
                x += c
            before.append(x)
            for _ in range(last):
                x += c
            after.append(x)
        return tuple(before), tuple(after)
    a = np.empty((len(xs), times + 1))
    a[:, 0] = xs
    a[:, 1:] = np.array(cs)[:, None]
    np.add.accumulate(a, axis=1, out=a)
    return tuple(a[:, times - last].tolist()), tuple(a[:, times].tolist())

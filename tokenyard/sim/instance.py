"""One simulated engine instance: the real ``Scheduler`` and ``KVCacheManager``, a cost model instead of a model
runner, a virtual clock. Pure Python.

A step is what the engine does: ``schedule()``, the step's time from the cost model (plus the KV copies it must
wait for), then ``update_from_output()`` with a sampled token for every chunk that samples. Overlapped swaps land
when their copy is done (copies run one after another on one copy engine).

**Collapsed decode spans.** After a step in which every running request decoded one token and nothing else
happened, the following steps are the same decision again until something changes it. Those steps are run as one
span: their times summed step by step with the very expression a step uses, then the requests advanced in bulk,
with the few block allocations and prefix-cache registrations they make replayed in step order, so the state
after the span is the state stepping reaches (``tests/test_sim.py`` checks it on random workloads). A span ends
before:

- an arrival (the caller bounds it in time) or a migration touching this instance;
- a finish (a request reaching max_tokens or the context window; sampled tokens are never stop tokens);
- a block shortage (a step whose allocations exceed the free blocks);
- a queue head that could start: a span with a queued head only runs under ``fcfs`` / ``priority`` (whose head
  does not change), when the head did not fit, may preempt no running request, and no block the span
  registers in the prefix cache continues the head's prefix hit;
- more decodes than the token budget, prefill work, KV in flight, or a preemption (none of which is a span).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenyard.invariants import require
from tokenyard.kv.manager import KVCacheManager
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig
from tokenyard.sim.cost import CostModel, StepShape

SAMPLED_TOKEN = 1   # every simulated output token (no request has stop tokens: lengths are max_tokens)


@dataclass
class RequestTimes:
    """What happened to one request, on the simulation's clock."""

    arrival: float
    token_times: list[float] = field(default_factory=list)   # end of the step that sampled each output token
    finish: float | None = None
    finish_reason: str | None = None
    instance: str = ""
    num_preemptions: int = 0
    num_migrations: int = 0
    num_cached_tokens: int = 0


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
                 on_finish: Callable[[Request, float], None] | None = None) -> None:
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
        times.instance = self.instance_id
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
    def run_until(self, limit: float) -> None:
        """Run every step that starts before ``limit`` (steps start when the previous one ends)."""
        while self.has_work and self.now < limit:
            if self._steady and self._span(limit):
                continue
            if not self._step():
                break   # nothing can run until something arrives

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
        self._steady = self.collapse and self._is_steady(out)
        return True

    def _emit(self, req: Request, t: float) -> None:
        times = self.times[req.request_id]
        if self.record_tokens or not times.token_times:
            times.token_times.append(t)
        if req.status.finished:
            self._finished(req, t)

    def _finished(self, req: Request, t: float) -> None:
        times = self.times.pop(req.request_id)
        times.finish = t
        times.finish_reason = req.status.value
        times.num_preemptions = req.num_preemptions
        times.num_cached_tokens = max(req.num_cached_tokens, 0)
        if not self.record_tokens and req.num_output_tokens > 1:
            times.token_times.append(t)   # first and last token times are always kept
        if self.on_finish is not None:
            self.on_finish(req, t)

    # ------------------------------------------------------------------ collapsed spans
    def _is_steady(self, out) -> bool:
        """Would the next steps repeat this one (every running request decoding, nothing else to start)?"""
        s = self.sched
        running = s.running
        if (not running or out.transfers or out.wait_for or out.preempted or self._in_flight or s.detached
                or len(out.chunks) != len(running) or len(running) > s.config.max_num_batched_tokens):
            return False
        for c in out.chunks:
            if len(c.token_ids) != 1 or not c.sample:
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
        n = 0 if overlap else min(head.num_tokens - computed, budget_left)
        return s._blocks_short(head, computed + n, hits) > 0

    def _span(self, limit: float) -> bool:
        """Run the decode steps that repeat the last one, starting before ``limit``. False: none can run."""
        s, kv, bs = self.sched, self.kv, self.kv.block_size
        running = s.running
        n = len(running)
        # Steps until the first finish (that step is a full one).
        k_max = min(min(r.max_tokens - r.num_output_tokens,
                        (r.max_model_len - r.num_tokens) if r.max_model_len is not None else 1 << 62)
                    for r in running) - 1
        if k_max <= 0:
            self._steady = False
            return False
        # Step times, the same expression per step as _step.
        cost = self.cost
        ctx = sum(r.num_computed_tokens + 1 for r in running)
        ends: list[float] = []
        t = self.now
        decode_time = cost.decode_time   # what step_time of a decode-only shape calls
        while len(ends) < k_max and t < limit:
            t = t + decode_time(n, ctx)
            ends.append(t)
            ctx += n
        k = len(ends)
        if k == 0:
            return False
        # Block allocations (schedule of step j, urgency order) and prefix registrations (update of step j, chunk
        # order = urgency order), replayed in step order; a shortage or a registration the queue head needs ends
        # the span before / after that step.
        head = s.policy.peek() if len(s.policy) else None
        head_next_hash = self._head_next_hash(head) if head is not None else None
        order = self._order_for_span()
        comp = {r.request_id: r.num_computed_tokens for r in running}
        free = kv.pool.num_free_blocks
        by_phase: dict[int, list[Request]] = {}
        for r in order:
            by_phase.setdefault(comp[r.request_id] % bs, []).append(r)
        caching = kv.enable_prefix_caching
        done = k
        for r in running:   # the tokens the span samples, present before the registrations hash them
            r.all_token_ids.extend([SAMPLED_TOKEN] * k)
        frozen = None if self._static_order else getattr(s.policy, "_frozen", None)
        for j in range(k):
            if not self._static_order:
                s.policy.begin_step()   # urgency from the counters as this step begins
            alloc = by_phase.get((-j) % bs, ())
            if alloc:
                if len(alloc) > free:
                    done = j
                    break
                if not self._static_order:
                    alloc = sorted(alloc, key=s.policy.urgency)
                for r in alloc:
                    ok = kv.allocate_slots(r.request_id, comp[r.request_id] + j + 1)
                    require(ok, f"span: {r.request_id} could not get a block the span counted as free")
                free = kv.pool.num_free_blocks
            if frozen is not None:   # as VTCPolicy.charge records them, before a tenant's first charge
                frozen = s.policy._frozen
                counter = s.ledger.counter
                for r in order:
                    if r.tenant not in frozen:
                        frozen[r.tenant] = counter[r.tenant]
            self._charge_step(order)
            if caching:
                reg = by_phase.get((-j - 1) % bs, ())
                if reg:
                    if not self._static_order:
                        reg = sorted(reg, key=s.policy.urgency)
                    for r in reg:
                        kv.cache_full_blocks(r.request_id, r.all_token_ids, comp[r.request_id] + j + 1, r.cache_salt)
                    if head_next_hash is not None and kv.pool.get_cached_block(head_next_hash) is not None:
                        done = j + 1
                        break
        if done < k:
            for r in running:
                del r.all_token_ids[len(r.all_token_ids) - (k - done):]
            if done == 0:
                self._steady = False
                return False
        for r in running:
            r.num_computed_tokens += done
            r.output_token_ids.extend([SAMPLED_TOKEN] * done)
        if self.record_tokens:
            seg = ends[:done]
            for r in running:
                self.times[r.request_id].token_times.extend(seg)
        st = self.stats
        st.busy_s += ends[done - 1] - self.now
        st.steps += done
        st.span_steps += done
        st.spans += 1
        st.tokens += n * done
        self.now = ends[done - 1]
        if done < k:
            self._steady = False   # the next step is a full one (a shortage or a head that may fit)
        if self.check:
            s.check_invariants()
        return True

    def _order_for_span(self) -> list[Request]:
        return sorted(self.sched.running, key=self.sched.policy.urgency)

    def _charge_step(self, order: list[Request]) -> None:
        """One decode step's charges, as ``ServiceLedger.charge`` makes them (same float operations per tenant)."""
        ledger = self.sched.ledger
        w_q = ledger.w_q
        service, counter, weights = ledger.service, ledger.counter, ledger.tenant_weights
        for r in order:
            t = r.tenant
            service[t] += w_q
            counter[t] += w_q / weights.get(t, 1.0)

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


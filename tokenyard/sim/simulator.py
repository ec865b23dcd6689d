"""The discrete-event simulation of one or many instances behind a dispatcher. Pure Python.

Events, in time order: arrivals (dispatched with the same ``cluster/dispatch.py`` policies the Ray frontend
uses, on loads read the way its instances report them), the coordinator's look at the loads every
``interval_s`` (``cluster/rebalance.py``'s ``plan_migrations``, the frontend's rule), migration stages, and each
instance's steps. At equal times an arrival comes before a step, so a request that arrives when a step begins is
in it. A step's effects are applied when it is decided; a load read between its start and its end sees them
(the real instance reports after the step: one step of skew).

A live migration is modelled as the engine does it in two parts: the running request's KV is copied while it
keeps decoding at the source (``migration_time`` of the blocks it has), then it is frozen, the blocks it grew
meanwhile are copied, and the destination adopts it (or, if the destination has no seat, it resumes at the
source). The real handshake may copy in up to ``max_stages`` rounds; the model uses one.

Requests come from the same ``RequestSpec`` list ``tokenyard bench`` sends; the result is the same
``RequestRecord`` list it measures, so every metric, table, JSON and plot of the bench applies unchanged.
"""

from __future__ import annotations

import copy
import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenyard.bench.records import RequestRecord
from tokenyard.bench.workload import RequestSpec, chains
from tokenyard.cluster.dispatch import DispatchInfo, make_dispatch
from tokenyard.cluster.load import scheduler_load
from tokenyard.cluster.rebalance import AutoScaler, plan_migrations
from tokenyard.sampling_params import InvalidParameterError
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import SchedulerConfig
from tokenyard.sim.cost import CostModel
from tokenyard.sim.instance import SAMPLED_TOKEN, RequestTimes, SimInstance


@dataclass
class SimConfig:
    num_instances: int = 1
    dispatch: str = "round-robin"
    migration: bool = False
    interval_s: float = 0.05          # the coordinator's period (as the frontend's ClusterConfig)
    migration_low: float = 4.0
    migration_gap: float = 8.0
    priority_headroom: int = 0
    num_kv_blocks: int | None = None  # per instance (default: the cost model's)
    num_host_blocks: int = 0
    enable_prefix_caching: bool = True
    block_groups: bool = True
    host_cache: bool = True
    max_model_len: int = 4096
    autoscale: tuple[int, int] | None = None   # (min, max) instances: AutoScaler keeps the mean freeness in a band
    instance_start_s: float = 20.0    # from the scale-up decision until the new instance serves (an assumption)
    priority_churn_s: float | None = None   # every this many seconds, each live request gets a new priority ...
    churn_priorities: tuple[int, ...] = (0, 1, 2, 3)   # ... drawn from these (bench's --priority-churn)
    seed: int = 0
    collapse: bool = True             # collapsed decode spans (off: every step run through the scheduler)
    record_tokens: bool = True        # every token's time (ITL); off: first and last only
    check_invariants: bool = False    # the scheduler's invariants after every step (tests)
    eager_routing: bool = True        # dispatch arrivals up front where nothing the run does can change where
                                      # they go (off: every arrival caps every instance's run; for tests)

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"--instances: must be at least 1, got {self.num_instances}")
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {self.interval_s}")
        if self.priority_churn_s is not None and not self.priority_churn_s > 0:
            raise ValueError(f"priority_churn_s must be positive, got {self.priority_churn_s}")
        make_dispatch(self.dispatch)   # the name is checked here
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not 1 <= lo <= self.num_instances <= hi:
                raise ValueError(f"autoscale {lo}:{hi} must hold the starting {self.num_instances} instances "
                                 f"(1 <= MIN <= --instances <= MAX)")
        if not self.instance_start_s >= 0:
            raise ValueError(f"instance_start_s must be >= 0, got {self.instance_start_s}")


@dataclass
class _Migration:
    src: SimInstance
    dst: SimInstance
    req: Request
    key: str
    copied: int


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration_s: float                      # simulated time until the last request ended
    instances: list[dict] = field(default_factory=list)
    migrations: int = 0
    migrations_aborted: int = 0
    steps: int = 0
    span_steps: int = 0
    instance_seconds: float = 0.0          # summed time each instance was up (started to stopped, or run end)
    scale_events: list[tuple[float, str, str]] = field(default_factory=list)   # (time, "start"|"drain"|"stop", id)


class Simulator:
    def __init__(self, sched_config: SchedulerConfig, cost: CostModel, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.sched_config = sched_config
        self.cost = cost
        c = self.config
        blocks = c.num_kv_blocks if c.num_kv_blocks is not None else cost.num_kv_blocks
        if blocks is None:
            raise ValueError("the number of KV blocks per instance is not known: give --num-kv-blocks")
        self.num_blocks = blocks
        self.instances: list[SimInstance] = []
        self.live: list[SimInstance] = []          # serving (a drained, stopped instance leaves this list)
        self.draining: set[str] = set()
        self._up_since: dict[str, float] = {}
        self._starting: list[float] = []           # when each instance being started will serve
        self.instance_seconds = 0.0
        self.scale_events: list[tuple[float, str, str]] = []
        for _ in range(c.num_instances):
            self._add_instance(0.0)
        self.scaler = (AutoScaler(min_instances=c.autoscale[0], max_instances=c.autoscale[1])
                       if c.autoscale is not None else None)
        self.dispatch = make_dispatch(c.dispatch, c.priority_headroom)
        self._loads_needed = c.dispatch != "round-robin"
        self._routed: dict[int, int] | None = None       # spec index -> instance, when routed up front
        self._due: list[deque[float]] = []                # per instance: its routed arrivals' times, in order
        self._arrivals: list[tuple[float, int, int]] = []   # (time, order, chain index, turn)
        self._steps: list[tuple[float, int, int]] = []      # (time, seq, instance index)
        self._scheduled: set[int] = set()                    # instances with a step event in the heap
        self._migrations: list[tuple[float, int, str, _Migration]] = []
        self._busy: set[str] = set()
        self._seq = 0
        self._rng = random.Random(self.config.seed)
        self.migrations = 0
        self.migrations_aborted = 0

    def _add_instance(self, t: float) -> SimInstance:
        c = self.config
        inst = SimInstance(f"i{len(self.instances)}", self.sched_config, self.cost, num_blocks=self.num_blocks,
                           num_host_blocks=c.num_host_blocks, enable_prefix_caching=c.enable_prefix_caching,
                           block_groups=c.block_groups, host_cache=c.host_cache, collapse=c.collapse,
                           check_invariants=c.check_invariants, record_tokens=c.record_tokens,
                           on_finish=self._on_finish)
        inst.now = t
        self.instances.append(inst)
        self.live.append(inst)
        self._up_since[inst.instance_id] = t
        return inst

    def _loads(self) -> list:
        loads = [scheduler_load(x.sched, x.instance_id) for x in self.live]
        for load in loads:
            load.draining = load.instance_id in self.draining
        return loads

    # ------------------------------------------------------------------ the run
    def run(self, specs: Sequence[RequestSpec]) -> SimResult:
        self._chains = chains(list(specs))
        self._records: dict[int, RequestRecord] = {}
        self._prompt: dict[int, list[int]] = {}       # chain -> the conversation so far (its last turn's tokens)
        self._turn_of: dict[str, tuple[int, int]] = {}
        for ci, chain in enumerate(self._chains):
            for spec in chain:
                self._records[spec.index] = RequestRecord(
                    spec.index, spec.input_len, spec.output_len, spec.tenant, spec.priority, spec.conversation,
                    spec.turn, scheduled_s=spec.arrival_s)
            self._push_arrival(chain[0].arrival_s or 0.0, ci, 0)
        chained = any(len(ch) > 1 for ch in self._chains)
        coordinating = self.config.migration or self.scaler is not None
        next_control = self.config.interval_s if coordinating else math.inf
        churn = self.config.priority_churn_s
        next_churn = churn if churn is not None else math.inf
        inf = math.inf
        if (self.config.eager_routing and not self._loads_needed and not chained and not coordinating
                and churn is None):
            self._route_up_front()
        while True:
            ta = self._arrivals[0][0] if self._arrivals else inf
            tm = self._migrations[0][0] if self._migrations else inf
            ts = self._steps[0][0] if self._steps else inf
            if ta == inf and tm == inf and ts == inf:
                break
            tc = next_control if (ts < inf or tm < inf or self.draining or self._starting) else inf
            tp = next_churn if ts < inf else inf
            t_ext = min(ta, tm, tc, tp)
            if t_ext <= ts:
                if tp == t_ext and ta != t_ext:
                    self._churn()
                    next_churn = tp + churn
                    continue
                if ta == t_ext:
                    _, _, ci, turn = heapq.heappop(self._arrivals)
                    if next_control < ta:   # idle meanwhile: the coordinator's next look after this arrival
                        next_control += math.ceil((ta - next_control) / self.config.interval_s) * self.config.interval_s
                    if next_churn < ta:
                        next_churn += math.ceil((ta - next_churn) / churn) * churn
                    self._arrive(ta, ci, turn)
                elif tm == t_ext:
                    self._migration_event(heapq.heappop(self._migrations))
                else:
                    self._control(tc)
                    next_control = tc + self.config.interval_s
                continue
            _, _, i = heapq.heappop(self._steps)
            self._scheduled.discard(i)
            inst = self.instances[i]
            limit = t_ext
            if self._routed is not None:   # only its own next arrival can change what this instance does
                limit = self._due[i][0] if self._due[i] else inf
            elif chained and self._steps:   # a finish elsewhere may send a turn: stay within the other instances
                limit = min(limit, self._steps[0][0])
            if inst.run_until(max(limit, math.nextafter(inst.now, inf))):
                self._schedule_step(i)
            # else blocked until something arrives (an arrival schedules it again)
        return self._result()

    def _route_up_front(self) -> None:
        """Choose every arrival's instance now, in arrival order, with the same calls ``_arrive`` would make then.

        Only where the choice reads no instance state (round-robin), every request is a single turn (nothing is
        sent at another's finish), and no migration, scaling or priority churn runs: then an instance's run
        needs capping only at its own next arrival, instead of at every arrival to any instance (at 16 instances,
        most decode spans were cut short by arrivals elsewhere)."""
        self._routed = {}
        self._due = [deque() for _ in self.instances]
        lite = self._lite()   # no instance starts or drains in such a run
        for t, _, ci, turn in sorted(self._arrivals):
            spec = self._chains[ci][turn]
            if spec.input_len + spec.output_len > self.config.max_model_len:
                continue   # refused at arrival, before dispatch
            idx = self._choose(f"r{spec.index}", self._new_tokens(spec), spec.priority or 0, lite)
            self._routed[spec.index] = idx
            self._due[idx].append(t)

    def _choose(self, rid: str, prompt: list[int], priority: int, lite: list[_Lite] | None = None) -> int:
        """The dispatcher's instance (an index) for a request of this prompt (``lite``: the instances, where the
        dispatcher reads no load)."""
        loads = self._loads() if self._loads_needed else lite or self._lite()
        chosen = self.dispatch.choose(loads, DispatchInfo(rid, len(prompt), hash(tuple(prompt[:64])), priority))
        return int(chosen[1:])

    def _lite(self) -> list[_Lite]:
        return [_Lite(x.instance_id, x.instance_id in self.draining) for x in self.live]

    @staticmethod
    def _new_tokens(spec: RequestSpec) -> list[int]:
        return [2 + (spec.index % 30000)] * spec.input_len   # distinct text per request: no accidental prefix hits

    def _push_arrival(self, t: float, ci: int, turn: int) -> None:
        self._seq += 1
        heapq.heappush(self._arrivals, (t, self._seq, ci, turn))

    def _schedule_step(self, i: int) -> None:
        inst = self.instances[i]
        if inst.has_work and i not in self._scheduled:
            self._seq += 1
            heapq.heappush(self._steps, (inst.now, self._seq, i))
            self._scheduled.add(i)

    # ------------------------------------------------------------------ arrivals
    def _arrive(self, t: float, ci: int, turn: int) -> None:
        spec = self._chains[ci][turn]
        rec = self._records[spec.index]
        rec.sent, rec.send_s = True, t
        prev = self._prompt.get(ci, [])
        prompt = prev + self._new_tokens(spec)
        rec.prompt_tokens = len(prompt)
        max_len = self.config.max_model_len
        if len(prompt) + spec.output_len > max_len:
            rec.fail("http_400", f"the prompt has {len(prompt)} tokens and max_tokens is {spec.output_len}, but "
                                 f"the context window is {max_len}", 0.0)
            self._next_turn(ci, turn, t, None)
            return
        rid = f"r{spec.index}"
        req = Request(rid, prompt, spec.output_len, priority=spec.priority or 0, tenant=spec.tenant or "default",
                      arrival_time=t, max_model_len=max_len)
        if self._routed is not None:
            idx = self._routed[spec.index]
            self._due[idx].popleft()
        else:
            idx = self._choose(rid, prompt, req.priority)
        inst = self.instances[idx]
        times = RequestTimes(arrival=t)
        try:
            inst.add_request(req, times)
        except InvalidParameterError as e:
            rec.fail("http_400", str(e), 0.0)
            self._next_turn(ci, turn, t, None)
            return
        self._turn_of[rid] = (ci, turn)
        self._schedule_step(idx)

    def _on_finish(self, req: Request, times: RequestTimes, t: float) -> None:
        ci, turn = self._turn_of.pop(req.request_id)
        spec = self._chains[ci][turn]
        rec = self._records[spec.index]
        a = times.arrival
        rec.ttft_s = times.token_times[0] - a if times.token_times else None
        rec.latency_s = t - a
        rec.token_s = [x - a for x in times.token_times]
        rec.output_tokens = req.num_output_tokens
        rec.finish_reason = req.status.value
        self._next_turn(ci, turn, t, req)

    def _next_turn(self, ci: int, turn: int, t: float, req: Request | None) -> None:
        chain = self._chains[ci]
        if turn + 1 < len(chain):
            if req is not None:
                self._prompt[ci] = req.all_token_ids[:req.num_prompt_tokens + req.num_output_tokens]
            self._push_arrival(t, ci, turn + 1)
        else:
            self._prompt.pop(ci, None)

    def _churn(self) -> None:
        """Every live request gets a priority drawn anew (in id order, from one seeded generator), as
        ``tokenyard bench serve --priority-churn`` does through the API."""
        choices = self.config.churn_priorities
        for inst in self.instances:
            ids = sorted(inst.sched.requests)
            for rid in ids:
                inst.sched.set_priority(rid, choices[self._rng.randrange(len(choices))])
            if ids:
                inst.touch()

    # ------------------------------------------------------------------ migration
    def _control(self, t: float) -> None:
        """The coordinator's look at the loads: instances that finished starting serve, drained ones stop, the
        auto-scaler decides, then migrations (from the least free, and off draining instances)."""
        while self._starting and self._starting[0] <= t:
            self._starting.pop(0)
            inst = self._add_instance(t)
            self.scale_events.append((t, "start", inst.instance_id))
        for inst in [x for x in self.live if x.instance_id in self.draining]:
            if not inst.has_work and not inst.sched.requests and not any(
                    m.src is inst for _, _, _, m in self._migrations):
                self.live.remove(inst)
                self.draining.discard(inst.instance_id)
                self.instance_seconds += max(t, inst.now) - self._up_since.pop(inst.instance_id)
                self.scale_events.append((t, "stop", inst.instance_id))
        loads = self._loads()
        c = self.config
        if self.scaler is not None:
            delta, victim = self.scaler.decide(loads, starting=len(self._starting))
            if delta > 0:
                self._starting.append(t + c.instance_start_s)
            elif delta < 0 and victim is not None:
                self.draining.add(victim)
                self.scale_events.append((t, "drain", victim))
                loads = self._loads()
        if not c.migration and not self.draining:
            return
        # Without the migration policy, only instances being drained are sources (as the frontend does).
        moves = plan_migrations(loads, low=c.migration_low if c.migration else -math.inf, gap=c.migration_gap,
                                priority_headroom=c.priority_headroom, busy=self._busy,
                                max_moves=max(len(loads) // 2, 1))
        for mv in moves:
            src, dst = self.instances[int(mv.src[1:])], self.instances[int(mv.dst[1:])]
            req = src.sched.requests.get(mv.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            key = f"m{self._seq}"
            self._seq += 1
            if dst.kv.reserve(key, mv.num_blocks + 1) is None:
                continue
            dst.touch()
            m = _Migration(src, dst, req, key, mv.num_blocks)
            self._busy.add(req.request_id)
            self._push_migration(t + self.cost.migration_time(mv.num_blocks), "freeze", m)

    def _push_migration(self, t: float, stage: str, m: _Migration) -> None:
        self._seq += 1
        heapq.heappush(self._migrations, (t, self._seq, stage, m))

    def _migration_event(self, ev: tuple[float, int, str, _Migration]) -> None:
        t, _, stage, m = ev
        rid = m.req.request_id
        if stage == "freeze":
            if m.req.is_prefilling or m.src.sched.detach(rid) is None:
                self._abort(m)
                return
            m.src.touch()
            grown = len(m.src.kv.req_blocks.get(rid, ())) - m.copied
            held = len(m.dst.kv.reservations.get(m.key, ()))
            need = len(m.src.kv.req_blocks.get(rid, ())) - held
            if need > 0 and m.dst.kv.reserve(m.key, need) is None:
                m.src.sched.reattach(rid)
                self._abort(m)
                self._schedule_step(self.instances.index(m.src))
                return
            self._push_migration(t + self.cost.migration_time(max(grown, 0)), "commit", m)
            return
        # commit: the destination adopts a copy of the request (the engine sends a snapshot); the source releases
        # its own
        if m.src.sched.detached.get(rid) is None or rid not in m.src.times:
            self._abort(m)
            return
        moved = copy.copy(m.req)
        moved.output_token_ids = list(m.req.output_token_ids)
        moved.all_token_ids = list(m.req.all_token_ids)
        if not m.dst.sched.adopt(moved, m.key):
            m.src.sched.reattach(rid)
            self._abort(m)
            self._schedule_step(self.instances.index(m.src))
            return
        m.src.sched.release(rid)
        m.dst.times[rid] = m.src.times.pop(rid)
        m.dst.touch()
        m.src.touch()
        self._busy.discard(rid)
        self.migrations += 1
        self._schedule_step(self.instances.index(m.dst))
        self._schedule_step(self.instances.index(m.src))

    def _abort(self, m: _Migration) -> None:
        m.dst.kv.release_reservation(m.key)
        m.dst.touch()
        self._busy.discard(m.req.request_id)
        self.migrations_aborted += 1

    # ------------------------------------------------------------------ results
    def _result(self) -> SimResult:
        recs = [self._records[i] for i in sorted(self._records)]
        ends = [r.end_s for r in recs if r.end_s is not None]
        starts = [r.send_s for r in recs if r.send_s is not None]
        inst = []
        steps = span_steps = 0
        end = max((x.now for x in self.instances), default=0.0)
        instance_seconds = self.instance_seconds + sum(end - self._up_since[x.instance_id] for x in self.live)
        for x in self.instances:
            st = x.stats
            steps += st.steps
            span_steps += st.span_steps
            inst.append({"instance": x.instance_id, "steps": st.steps, "span_steps": st.span_steps,
                         "spans": st.spans, "busy_s": st.busy_s, "tokens": st.tokens,
                         "preemptions": x.sched.num_preemptions})
        return SimResult(recs, (max(ends) - min(starts)) if ends else 0.0, inst, self.migrations,
                         self.migrations_aborted, steps, span_steps, instance_seconds, self.scale_events)


@dataclass
class _Lite:
    """What round-robin needs of an instance: its id (no load is read)."""

    instance_id: str
    draining: bool = False


__all__ = ["Simulator", "SimConfig", "SimResult", "SAMPLED_TOKEN"]

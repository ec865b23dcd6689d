"""Many engine instances behind one endpoint: the frontend and global scheduler of a tokenyard cluster.

``ClusterEngine`` has ``AsyncEngine``'s interface, so the OpenAI server runs on it unchanged. It owns what must
survive a request moving between instances: one ``_Req`` per request (global id, token ids, sampling params,
which instance runs it, its stream) and the output processing (detokenization, stop strings). Instances are Ray
actors (``InstanceWorker``) that emit token ids.

Threads: the caller's event loop (add, abort, priority: short critical sections under ``_lock``, then Ray
calls), one poller thread (a long poll per instance, ``ray.wait`` on all of them; applies events in order;
notices dead instances and resumes their requests elsewhere) and one coordinator thread (migration and
auto-scaling decisions every ``interval`` seconds; it runs each migration's handshake itself).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from tokenyard.cluster.dispatch import DispatchInfo, NoInstanceError, make_dispatch
from tokenyard.cluster.load import InstanceLoad
from tokenyard.cluster.migration import MigrationResult, migrate
from tokenyard.cluster.rebalance import AutoScaler, plan_migrations
from tokenyard.cluster.runtime.instance import AddItem, InstanceActor, PollReply
from tokenyard.config import EngineConfig
from tokenyard.engine.async_engine import (
    EngineUnavailableError,
    QueueFullError,
    RequestStream,
    StreamingEngine,
    _Stream,
)
from tokenyard.engine.llm_engine import check_max_tokens, tokenize_prompt
from tokenyard.engine.output_processor import OutputProcessor, TokenEvent
from tokenyard.model.config import ModelConfig
from tokenyard.model.loader import read_hf_config, resolve_model
from tokenyard.model.tokenizer import Tokenizer
from tokenyard.outputs import RequestOutput
from tokenyard.sampling_params import InvalidParameterError, SamplingParams

log = logging.getLogger(__name__)

_ALIVE = ("running", "draining")   # other states: starting, dead (lost), stopped (drained)
# Engine stats that describe the present (summed over live instances); every other one is a running count
# (summed over every instance that ever ran, so the series never goes down when one is lost or drained).
_STATE_STATS = frozenset({"num_running", "num_waiting", "num_swapped", "kv_blocks_used", "kv_blocks_free",
                          "kv_blocks_total", "num_swapping"})


@dataclass
class ClusterConfig:
    num_instances: int = 2
    dispatch: str = "freeness"
    migration: bool = True
    interval_s: float = 0.05            # how often the coordinator looks at the loads
    migration_low: float = 4.0          # a source's freeness is below this (blocks per running request) ...
    migration_gap: float = 8.0          # ... and its destination's at least this much higher
    priority_headroom: int = 0          # blocks of virtual usage per running request more urgent than priority 0
    max_stages: int = 3                 # copy stages after the destination first caught up
    stage_bytes: int = 16 << 20         # KV one stage copies at most (how long it holds up the source's decoding)
    autoscale: AutoScaler | None = None
    ray_address: str | None = None      # None: start a local Ray; "auto": join a running cluster
    instance_threads: int | None = None  # torch threads per instance (default: this machine's cores / instances)


@dataclass(eq=False)
class _Req:
    """The one owner object of a request in the frontend."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    tenant: str
    cache_salt: str | None
    arrival_time: float
    stream: _Stream
    instance: str = ""
    offset: int = 0                       # output tokens made before the current instance's copy (a resume)
    buffered: dict[int, TokenEvent] = field(default_factory=dict)
    migrating: bool = False
    aborted: bool = False
    done: bool = False
    priority_changed: bool = False        # while migrating: re-applied on the destination after the commit
    # Instances whose events count: the one running it, and a migration's source (its last events may come
    # late). A resume after an instance is lost starts afresh: anything else is stale.
    accept_from: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Instance:
    instance_id: str
    actor: Any
    state: str = "running"                # starting | running | draining | dead | stopped
    load: InstanceLoad | None = None
    stats: dict[str, float] = field(default_factory=dict)
    tenant_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    poll_ref: Any = None
    add_seq: int = 0
    pending: dict[int, tuple[int, int]] = field(default_factory=dict)   # add seq -> (requests, blocks)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class ClusterEngine(StreamingEngine):
    """``AsyncEngine``'s interface over many instances (see the module docstring)."""

    def __init__(self, config: EngineConfig, cluster: ClusterConfig | None = None, max_waiting: int = 256,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.config = config
        self.cluster = cluster = cluster or ClusterConfig()
        if cluster.num_instances < 1:
            raise ValueError(f"--instances must be >= 1, got {cluster.num_instances}")
        self.dispatch = make_dispatch(cluster.dispatch, cluster.priority_headroom)
        self.max_waiting = max_waiting
        self.on_failure = on_failure
        resolved = resolve_model(config.model)
        self.tokenizer = Tokenizer(resolved.hf_dir)
        self.model_config = ModelConfig.from_hf(read_hf_config(resolved.hf_dir))
        mc = self.model_config
        self.model_name = resolved.name
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.scheduling_policy = config.scheduling_policy
        self.block_size = config.block_size
        self._lock = threading.RLock()
        self._outputs = OutputProcessor(self.tokenizer)
        self._reqs: dict[str, _Req] = {}
        self._instances: dict[str, _Instance] = {}
        self._instance_ids = itertools.count()
        self._ids = itertools.count()
        self._mig_ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]
        self._num_waiting = 0
        self._accepting = True
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._starting = 0
        # Cluster counters (for /metrics and the benchmarks).
        self.migrations: list[MigrationResult] = []
        self.num_migrations_aborted = 0
        self.num_resumed_after_failure = 0
        self.instance_start_s: list[float] = []
        self._threads: list[threading.Thread] = []
        self._started_ray = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start Ray (or join it), the instances and the frontend's threads; blocks until every instance is up."""
        if self._threads:
            return
        if not ray.is_initialized():
            if self.cluster.ray_address is not None:
                ray.init(address=self.cluster.ray_address, log_to_driver=True)
            else:
                ray.init(include_dashboard=False, log_to_driver=True)
                self._started_ray = True
        insts = [self._spawn() for _ in range(self.cluster.num_instances)]
        try:
            for inst in insts:
                self._await_ready(inst)
        except Exception as e:
            self.close()
            raise ValueError(f"an engine instance failed to start: {e}") from None
        self._threads = [threading.Thread(target=self._poll_loop, name="tokenyard-poller", daemon=True),
                         threading.Thread(target=self._coordinate, name="tokenyard-coordinator", daemon=True)]
        for t in self._threads:
            t.start()

    def _engine_config(self) -> EngineConfig:
        threads = self.cluster.instance_threads
        if threads is None and self.config.num_threads is None:
            threads = max((os.cpu_count() or 1) // self.cluster.num_instances, 1)
        return replace(self.config, num_threads=threads or self.config.num_threads)

    def _spawn(self) -> _Instance:
        iid = f"i{next(self._instance_ids)}"
        actor = InstanceActor.options(name=None, max_concurrency=16, num_cpus=0, max_restarts=0).remote(
            iid, self._engine_config())
        inst = _Instance(iid, actor, state="starting")
        inst.info["t0"] = time.perf_counter()
        with self._lock:
            self._instances[iid] = inst
        return inst

    def _await_ready(self, inst: _Instance) -> None:
        log.info("starting instance %s ...", inst.instance_id)
        info = ray.get(inst.actor.info.remote())
        with self._lock:
            inst.info.update(info)
            inst.state = "running"
            inst.load = InstanceLoad(inst.instance_id, info["num_blocks"], info["block_size"])
            inst.poll_ref = inst.actor.poll.remote(0.5)
            self.instance_start_s.append(time.perf_counter() - inst.info["t0"])
        log.info("instance %s up (pid %s, %.1f s)", inst.instance_id, info["pid"], self.instance_start_s[-1])

    @property
    def is_running(self) -> bool:
        with self._lock:
            alive = any(i.state in _ALIVE for i in self._instances.values())
        return alive and self._dead is None and self._accepting and not self._stop.is_set()

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def abort_all(self) -> None:
        with self._lock:
            ids = list(self._reqs)
        self.abort(ids)

    async def shutdown(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self.num_inflight and time.monotonic() < deadline and self._dead is None:
            await asyncio.sleep(0.05)
        self.abort_all()
        self.close()

    def close(self) -> None:
        """Stop the threads and the instances (and the Ray this engine started)."""
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
        with self._lock:
            insts = list(self._instances.values())
        for inst in insts:
            if inst.state in _ALIVE:
                try:
                    ray.kill(inst.actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    # ------------------------------------------------------------------ requests
    async def add_requests(self, items: list[tuple[str | list[int], SamplingParams]], *, priority: int = 0,
                           tenant: str = "default", request_ids: list[str] | None = None,
                           cache_salt: str | None = None) -> list[RequestStream]:
        """Validate, dispatch and queue several requests, all or nothing."""
        loop = asyncio.get_running_loop()
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidParameterError("priority", f"priority must be an integer, got {priority!r}")
        ids = request_ids or [f"{self._id_prefix}-{next(self._ids)}" for _ in items]
        reqs: list[_Req] = []
        now = time.monotonic()
        for rid, (prompt, params) in zip(ids, items, strict=True):
            toks = await asyncio.to_thread(tokenize_prompt, self.tokenizer, prompt, self.model_config.vocab_size,
                                           self.max_model_len)
            check_max_tokens(len(toks), params.max_tokens, self.max_model_len)
            stream = _Stream(loop, asyncio.Queue(), max((len(s) for s in params.stop), default=1) - 1)
            reqs.append(_Req(rid, toks, params, priority, tenant, cache_salt, now, stream))
        with self._lock:
            self._check_accepting()
            if self._num_waiting + len(items) > self.max_waiting:
                raise QueueFullError(f"the server is busy: {self._num_waiting} requests are waiting "
                                     f"(--max-waiting {self.max_waiting}); retry later")
            if any(r.request_id in self._reqs for r in reqs):
                raise InvalidParameterError("request_id", "request_id is already in use")
            for r in reqs:
                self._reqs[r.request_id] = r
                self._outputs.add(r.request_id, r.prompt_token_ids, r.params, r.arrival_time)
            self._num_waiting += len(reqs)
            try:
                calls = self._dispatch_locked(reqs)
            except NoInstanceError as e:
                for r in reqs:
                    self._forget_locked(r)
                raise EngineUnavailableError(str(e)) from None
        try:
            results = await asyncio.gather(*calls)
        except BaseException:
            self.abort([r.request_id for r in reqs])
            raise
        errors = [e for res in results for e in res if e is not None]
        if errors:
            self.abort([r.request_id for r in reqs])
            param, msg = errors[0]
            raise InvalidParameterError(param, msg)
        return [RequestStream(self, r.request_id, r.stream.queue) for r in reqs]

    async def set_priority(self, request_ids: list[str], priority: int) -> int:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidParameterError("priority", f"priority must be an integer, got {priority!r}")
        calls = []
        with self._lock:
            if self._dead is not None or not self._instances:
                raise EngineUnavailableError("the engine is not running")
            n = 0
            for rid in request_ids:
                r = self._reqs.get(rid)
                if r is None or r.done:
                    continue
                r.priority = priority
                r.priority_changed = r.migrating
                n += 1
                inst = self._instances.get(r.instance)
                if inst is not None and inst.state in _ALIVE and not r.migrating:
                    calls.append(inst.actor.set_priority.remote([rid], priority))
        for c in calls:   # a migration re-applies r.priority on its destination once it commits
            try:
                await c
            except Exception:  # noqa: BLE001 - the instance died; its requests resume elsewhere with r.priority
                pass
        return n

    def abort(self, request_ids: str | list[str]) -> None:
        """Abort requests (from any thread); each open stream ends with finish_reason "abort"."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        by_instance: dict[str, list[str]] = {}
        with self._lock:
            for rid in ids:
                r = self._reqs.get(rid)
                if r is None or r.done:
                    continue
                r.aborted = True
                if not r.migrating:   # a migration aborts it on whichever instance holds it at the end
                    by_instance.setdefault(r.instance, []).append(rid)
                out = self._outputs.abort(rid, None, time.monotonic())
                self._deliver_locked(r, out)
            for iid, rids in by_instance.items():
                inst = self._instances.get(iid)
                if inst is not None and inst.state in _ALIVE:
                    inst.actor.abort.remote(rids)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, float]:
        with self._lock:
            s: dict[str, float] = {}
            for inst in self._instances.values():
                alive = inst.state in _ALIVE
                for k, v in inst.stats.items():
                    if alive or k not in _STATE_STATS:
                        s[k] = s.get(k, 0.0) + v
            s["num_pending"] = self._num_waiting
            s["num_inflight"] = len(self._reqs)
            s["num_instances"] = sum(i.state in _ALIVE for i in self._instances.values())
            s["migrations"] = len(self.migrations)
            s["migrations_aborted"] = self.num_migrations_aborted
            s["resumed_after_failure"] = self.num_resumed_after_failure
            s["instances_started"] = len(self.instance_start_s)
            s["instance_start_seconds"] = self.instance_start_s[-1] if self.instance_start_s else 0.0
        return s

    def tenant_stats(self) -> dict[str, tuple[float, float]]:
        """Per tenant, summed over the instances (a lost or stopped one keeps its last report, so the service
        series stay monotonic): service, and the sum of the instances' virtual counters."""
        out: dict[str, tuple[float, float]] = {}
        with self._lock:
            for inst in self._instances.values():
                for t, (service, counter) in inst.tenant_stats.items():
                    s0, c0 = out.get(t, (0.0, 0.0))
                    out[t] = (s0 + service, c0 + counter)
        return out

    def instances(self) -> list[dict[str, Any]]:
        """Each instance's state and load (for /health)."""
        with self._lock:
            out = []
            for inst in self._instances.values():
                ld = inst.load
                out.append({"id": inst.instance_id, "state": inst.state, "pid": inst.info.get("pid"),
                            "running": ld.num_running if ld else 0, "waiting": ld.num_waiting if ld else 0,
                            "kv_blocks_used": ld.used_blocks if ld else 0, "error": inst.error})
            return out

    @property
    def kv_capacity_tokens(self) -> int:
        """The most KV one request may hold: the smallest instance's pool (a request runs on one instance)."""
        with self._lock:
            sizes = [i.info["num_blocks"] * i.info["block_size"] for i in self._instances.values()
                     if i.state in _ALIVE and "num_blocks" in i.info]
        return min(sizes, default=0)

    @property
    def num_inflight(self) -> int:
        with self._lock:
            return len(self._reqs)

    # ------------------------------------------------------------------ dispatch
    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineUnavailableError(f"the cluster frontend died: {self._dead!r}")
        if not self._accepting or self._stop.is_set():
            raise EngineUnavailableError("the server is shutting down")

    def _loads_locked(self) -> list[InstanceLoad]:
        out = []
        for inst in self._instances.values():
            if inst.state not in _ALIVE or inst.load is None:
                continue
            n = sum(p[0] for p in inst.pending.values())
            b = sum(p[1] for p in inst.pending.values())
            out.append(replace(inst.load, pending_requests=n, pending_blocks=b, draining=inst.state == "draining"))
        return out

    def _prefix_key(self, toks: list[int], salt: str | None) -> int | None:
        if len(toks) <= self.block_size:
            return None
        return hash((salt, tuple(toks[: self.block_size * min(4, (len(toks) - 1) // self.block_size)])))

    def _dispatch_locked(self, reqs: list[_Req]) -> list[Any]:
        """Pick an instance for each request and send it there; returns the Ray calls to await."""
        groups: dict[str, list[_Req]] = {}
        for r in reqs:
            loads = self._loads_locked()
            iid = self.dispatch.choose(loads, DispatchInfo(r.request_id, len(r.prompt_token_ids),
                                                           self._prefix_key(r.prompt_token_ids, r.cache_salt),
                                                           r.priority))
            self._place_locked(r, iid, len(r.prompt_token_ids))
            groups.setdefault(iid, []).append(r)
        calls = []
        for iid, group in groups.items():
            inst = self._instances[iid]
            items = [AddItem(r.request_id, r.prompt_token_ids, r.params, r.priority, r.tenant, r.cache_salt,
                             r.arrival_time) for r in group]
            calls.append(inst.actor.add.remote(items, inst.add_seq))
        return calls

    def _place_locked(self, r: _Req, iid: str, num_tokens: int) -> _Instance:
        """``r`` runs on ``iid`` from now on: only its events count, and until the instance reports it, it counts
        as dispatched there (one request, its prompt's blocks)."""
        r.instance = iid
        r.accept_from = {iid}
        inst = self._instances[iid]
        inst.add_seq += 1
        inst.pending[inst.add_seq] = (1, -(-num_tokens // self.block_size))
        return inst

    # ------------------------------------------------------------------ the poller thread
    def _poll_loop(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    refs = {i.poll_ref: i for i in self._instances.values()
                            if i.state in _ALIVE and i.poll_ref is not None}
                if not refs:
                    time.sleep(0.05)
                    continue
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.2)
                for ref in ready:
                    inst = refs[ref]
                    try:
                        reply: PollReply = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - the actor's process is gone (killed, crashed)
                        self._instance_lost(inst, f"{type(e).__name__}: {e}")
                        continue
                    if reply.error is not None:
                        with self._lock:   # what it made before its loop died still counts
                            for ev in reply.events:
                                self._on_event_locked(ev, inst.instance_id)
                        self._instance_lost(inst, reply.error)
                        continue
                    with self._lock:
                        inst.poll_ref = inst.actor.poll.remote(0.5)
                        inst.load, inst.stats, inst.tenant_stats = reply.load, reply.stats, reply.tenant_stats
                        for seq in [s for s in inst.pending if s <= reply.last_add_seq]:
                            del inst.pending[seq]
                        for ev in reply.events:
                            self._on_event_locked(ev, inst.instance_id)
        except BaseException as e:  # noqa: BLE001 - the frontend cannot go on: fail every stream, tell the server
            log.exception("cluster poller failed")
            self._fail_all(e)

    def _on_event_locked(self, ev: TokenEvent, instance_id: str) -> None:
        r = self._reqs.get(ev.request_id)
        if r is None or r.done or instance_id not in r.accept_from:
            return
        if ev.error is not None:
            self._apply_locked(r, ev)
            return
        pos = ev.position + r.offset
        have = len(self._outputs.output(r.request_id).token_ids)
        if pos < have:
            return                      # already applied (an event from before a resume)
        r.buffered[pos] = ev
        while not r.done and have in r.buffered:
            self._apply_locked(r, r.buffered.pop(have))
            have += 1

    def _apply_locked(self, r: _Req, ev: TokenEvent) -> None:
        out, ended_here = self._outputs.apply(ev, time.monotonic())
        if ended_here:   # the instance does not know the request ended: stop it there
            inst = self._instances.get(r.instance)
            if inst is not None and inst.state in _ALIVE and not r.migrating:
                inst.actor.abort.remote([r.request_id])
            r.aborted = True
        self._deliver_locked(r, out)

    def _deliver_locked(self, r: _Req, out: RequestOutput | None) -> None:
        if out is None:
            return
        s = r.stream
        delta = s.delta(out)
        if not s.started and (out.new_token_ids or out.finished):
            s.started = True
            self._num_waiting -= 1
        s.push(delta)
        if out.finished:
            self._forget_locked(r)

    def _forget_locked(self, r: _Req) -> None:
        if r.done:
            return
        r.done = True
        if not r.stream.started:
            r.stream.started = True
            self._num_waiting -= 1
        self._reqs.pop(r.request_id, None)
        self._outputs.abort(r.request_id)   # no-op when it finished normally

    # ------------------------------------------------------------------ instance failures
    def _instance_lost(self, inst: _Instance, why: str) -> None:
        """An instance died: each of its requests resumes on another instance from its prompt plus the tokens
        already streamed (recomputed there), so the client sees neither a gap nor a repeat."""
        with self._lock:
            if inst.state not in _ALIVE:
                return
            log.error("instance %s lost: %s", inst.instance_id, why)
            inst.state, inst.error, inst.pending = "dead", why, {}
            victims = [r for r in self._reqs.values() if r.instance == inst.instance_id and not r.done]
            for r in victims:
                if not r.migrating:   # else its migration decides: committed elsewhere, or resumed when it ends
                    self._resume_locked(r)
        try:
            ray.kill(inst.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
        with self._lock:
            left = any(i.state in _ALIVE for i in self._instances.values()) or self._starting
        if not left and self.on_failure is not None:   # nothing can serve: the server exits non-zero
            self.on_failure(RuntimeError(f"every instance is lost (the last: {why})"))

    def _resume_locked(self, r: _Req) -> None:
        out = self._outputs.output(r.request_id)
        made = len(out.token_ids)
        p = r.params
        params = replace(p, max_tokens=p.max_tokens - made, min_tokens=max(p.min_tokens - made, 0),
                         seed=None if p.seed is None else p.seed + made)
        r.offset, r.buffered = made, {}
        toks = r.prompt_token_ids + list(out.token_ids)
        try:
            iid = self.dispatch.choose(self._loads_locked(), DispatchInfo(r.request_id, len(toks), None, r.priority))
        except NoInstanceError:
            self._deliver_locked(r, self._outputs.abort(r.request_id, "its instance died and no other instance "
                                                        "is left to resume it", time.monotonic()))
            return
        inst = self._place_locked(r, iid, len(toks))
        inst.actor.add.remote([AddItem(r.request_id, toks, params, r.priority, r.tenant, r.cache_salt,
                                       r.arrival_time)], inst.add_seq)
        self.num_resumed_after_failure += 1
        log.warning("request %s resumes on %s after %d tokens", r.request_id, iid, made)

    def _fail_all(self, e: BaseException) -> None:
        self._dead = e
        with self._lock:
            for r in list(self._reqs.values()):
                r.stream.push(EngineUnavailableError(f"the cluster frontend died: {e!r}"))
                self._forget_locked(r)
        if self.on_failure is not None:
            self.on_failure(e)

    # ------------------------------------------------------------------ the coordinator thread
    def _coordinate(self) -> None:
        try:
            while not self._stop.wait(self.cluster.interval_s):
                self._rebalance_once()
                self._stop_drained()
                if self.cluster.autoscale is not None:
                    self._autoscale_once()
        except BaseException as e:  # noqa: BLE001
            log.exception("cluster coordinator failed")
            self._fail_all(e)

    def _rebalance_once(self) -> None:
        c = self.cluster
        with self._lock:
            loads = self._loads_locked()
            busy = {r.request_id for r in self._reqs.values() if r.migrating}
            if not c.migration and not any(x.draining for x in loads):
                return
            # Without the migration policy, only instances being drained are sources.
            moves = plan_migrations(loads, low=c.migration_low if c.migration else -math.inf, gap=c.migration_gap,
                                    priority_headroom=c.priority_headroom, busy=busy,
                                    max_moves=max(len(loads) // 2, 1))
        for mv in moves:
            try:
                self.migrate_request(mv.request_id, mv.dst, num_blocks=mv.num_blocks + 1)
            except Exception:  # noqa: BLE001 - one failed move must not stop the coordinator
                log.exception("migrating %s to %s failed", mv.request_id, mv.dst)

    def migrate_request(self, request_id: str, dst_id: str, num_blocks: int | None = None,
                        check: Callable[[str], bool] | None = None,
                        max_stages: int | None = None) -> MigrationResult | None:
        """Move a running request to instance ``dst_id`` (the coordinator's moves; tests and benchmarks call it
        directly). ``max_stages=0``: a blocking copy (every block copied while the request is frozen). None if
        the request is not live or already moving."""
        with self._lock:
            r = self._reqs.get(request_id)
            if r is None or r.done or r.migrating or r.instance == dst_id:
                return None
            src, dst = self._instances.get(r.instance), self._instances.get(dst_id)
            if src is None or dst is None or src.state not in _ALIVE or dst.state not in ("running",):
                return None
            r.migrating = True
            r.accept_from.add(dst_id)   # it emits from the step after the commit, maybe before migrate() returns
            if num_blocks is None:
                num_blocks = -(-(len(r.prompt_token_ids) + len(self._outputs.output(request_id).token_ids) + 1)
                               // self.block_size)
        key = f"mig-{next(self._mig_ids)}-{request_id}"

        def go_on(phase: str) -> bool:   # a client abort stops the migration at the next phase
            return not r.aborted and (check is None or check(phase))

        try:
            res = migrate(_RemoteEndpoint(src.actor), _RemoteEndpoint(dst.actor), request_id, key, num_blocks,
                          max_stages=self.cluster.max_stages if max_stages is None else max_stages,
                          stage_bytes=self.cluster.stage_bytes, check=go_on)
        except BaseException:
            with self._lock:
                r.migrating = False
            raise
        with self._lock:
            r.migrating = False
            for ev in res.source_extra:   # the source's unpolled events for it, handed over with the freeze
                self._on_event_locked(ev, src.instance_id)
            if res.committed:
                r.instance = dst_id
                self.migrations.append(res)
                log.info("migrated %s %s -> %s: %d blocks in %d stages, frozen %.1f ms", request_id, src.instance_id,
                         dst_id, res.blocks_staged + res.blocks_final, res.stages, res.downtime_s * 1e3)
            else:
                self.num_migrations_aborted += 1
                if dst_id != r.instance:
                    r.accept_from.discard(dst_id)
                log.info("migration of %s %s -> %s given up: %s", request_id, src.instance_id, dst_id, res.reason)
            owner = self._instances[r.instance]
            if owner.state in _ALIVE:
                if r.aborted or r.done:
                    owner.actor.abort.remote([request_id])
                elif r.priority_changed:
                    owner.actor.set_priority.remote([request_id], r.priority)
            r.priority_changed = False
            if not r.done and not r.aborted and self._instances[r.instance].state not in _ALIVE:
                self._resume_locked(r)
        return res

    def drain_instance(self, instance_id: str) -> None:
        """Scale in by hand: send nothing more to the instance, migrate its requests away, then stop it."""
        with self._lock:
            inst = self._instances[instance_id]
            if inst.state == "running":
                if sum(i.state == "running" for i in self._instances.values()) < 2:
                    raise ValueError("cannot drain the last running instance")
                inst.state = "draining"
                log.info("draining instance %s", instance_id)

    def _stop_drained(self) -> None:
        with self._lock:
            done = [i for i in self._instances.values() if i.state == "draining" and i.load is not None
                    and not i.pending and i.load.num_running == 0 and i.load.num_waiting == 0
                    and not any(r.instance == i.instance_id and not r.done for r in self._reqs.values())]
            for inst in done:
                inst.state, inst.error = "stopped", "drained (scaled in)"
        for inst in done:
            ray.kill(inst.actor)
            log.info("instance %s drained and stopped", inst.instance_id)

    def _autoscale_once(self) -> None:
        scaler = self.cluster.autoscale
        with self._lock:
            loads = self._loads_locked()
            starting = self._starting
        delta, victim = scaler.decide(loads, starting)
        if delta > 0:
            with self._lock:
                self._starting += 1
            inst = self._spawn()
            try:
                self._await_ready(inst)
            except Exception as e:  # noqa: BLE001 - the cluster goes on with what it has
                log.error("scale-out: instance %s failed to start: %s", inst.instance_id, e)
                with self._lock:
                    inst.state, inst.error = "dead", f"failed to start: {e}"
                try:
                    ray.kill(inst.actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            finally:
                with self._lock:
                    self._starting -= 1
        elif delta < 0 and victim is not None:
            self.drain_instance(victim)


class _RemoteEndpoint:
    """A Ray actor as a migration endpoint: KV goes from one actor to the other as object refs, never through
    the frontend."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def reserve(self, key: str, num_blocks: int) -> bool:
        return ray.get(self.actor.reserve.remote(key, num_blocks))

    def read_blocks(self, request_id: str, start: int, max_bytes: int | None) -> tuple[Any, Any]:
        info_ref, data_ref = self.actor.read_blocks.remote(request_id, start, max_bytes)
        return ray.get(info_ref), data_ref

    def write(self, key: str, start: int, data: Any) -> bool:
        return ray.get(self.actor.write.remote(key, start, data))

    def freeze(self, request_id: str, start: int, num_preemptions: int | None) -> tuple[Any, Any]:
        head_ref, data_ref = self.actor.freeze.remote(request_id, start, num_preemptions)
        return ray.get(head_ref), data_ref

    def commit(self, key: str, snapshot: Any, start: int, data: Any) -> bool:
        return ray.get(self.actor.commit.remote(key, snapshot, start, data))

    def resume(self, request_id: str) -> bool:
        return ray.get(self.actor.resume.remote(request_id))

    def release(self, request_id: str) -> bool:
        return ray.get(self.actor.release.remote(request_id))

    def abort(self, key: str) -> None:
        ray.get(self.actor.abort_migration.remote(key))


"""One engine instance in its own process: the Ray actor behind each of the cluster's instances.

Thread model (as in ``AsyncEngine``): the ``LLMEngine`` is touched by one thread only, the loop thread. Every
actor method (Ray runs them on a pool of threads: a threaded actor) queues a command and waits for the loop
thread to run it between two steps. The loop emits token ids, never text: the frontend detokenizes, so a
request's text state never has to move. The frontend long-polls :meth:`InstanceWorker.poll`, which returns
every event since the previous poll and the instance's load, one message per instance per step at most.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import ray

from tokenyard.cluster.load import InstanceLoad, scheduler_load
from tokenyard.config import EngineConfig
from tokenyard.engine.llm_engine import LLMEngine
from tokenyard.engine.migration import MigrationEndpoint
from tokenyard.engine.output_processor import TokenEvent
from tokenyard.sampling_params import InvalidParameterError, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class AddItem:
    """A request the frontend dispatched here, already tokenized and validated there."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    tenant: str = "default"
    cache_salt: str | None = None
    arrival_time: float | None = None


@dataclass
class PollReply:
    events: list[TokenEvent] = field(default_factory=list)
    load: InstanceLoad | None = None
    stats: dict[str, float] = field(default_factory=dict)
    last_add_seq: int = 0          # the last ``add`` call applied (the frontend's dispatched-but-unseen count)
    tenant_stats: dict[str, tuple[float, float]] = field(default_factory=dict)   # (service, counter) per tenant
    error: str | None = None       # the loop thread died: the instance is lost


def instance_load(engine: LLMEngine, instance_id: str) -> InstanceLoad:
    """The load report of one engine (its scheduler's queues and KV pool)."""
    return scheduler_load(engine.scheduler, instance_id)


class InstanceWorker:
    def __init__(self, instance_id: str, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.instance_id = instance_id
        self.engine = LLMEngine(config)
        self.migration = MigrationEndpoint(self.engine)
        self._cv = threading.Condition()
        self._commands: list[tuple[Callable[[], Any], Future]] = []
        self._events: list[TokenEvent] = []
        self._stop = False
        self._dead: str | None = None
        self._add_seq = 0
        self._tombstones: dict[str, float] = {}   # aborted before their add arrived -> when
        self._load = instance_load(self.engine, instance_id)
        self._stats = self.engine.stats()
        self._tenant_stats = self.engine.tenant_stats()
        self._tenant_stats_at = 0.0
        self.start_time_s = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._run, name=f"tokenyard-{instance_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ facts
    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"instance_id": self.instance_id, "pid": os.getpid(), "model_name": e.model_name,
                "max_model_len": e.max_model_len, "num_blocks": e.kv.pool.num_blocks, "block_size": e.kv.block_size,
                "start_time_s": self.start_time_s, "load_time_s": e.load_time_s,
                "scheduling_policy": e.config.scheduling_policy}

    # ------------------------------------------------------------------ requests
    def add(self, items: list[AddItem], seq: int) -> list[tuple[str, str] | None]:
        """Queue requests; per item None or (parameter, message) of why it was refused."""
        def run() -> list[tuple[str, str] | None]:
            errs: list[tuple[str, str] | None] = []
            for it in items:
                if self._tombstones.pop(it.request_id, None) is not None:
                    errs.append(None)   # aborted before it arrived
                    continue
                try:
                    self.engine.add_request(it.prompt_token_ids, it.params, request_id=it.request_id,
                                            priority=it.priority, tenant=it.tenant, cache_salt=it.cache_salt,
                                            arrival_time=it.arrival_time, track_output=False)
                    errs.append(None)
                except InvalidParameterError as e:
                    errs.append((e.param, str(e)))
                except ValueError as e:
                    errs.append(("prompt", str(e)))
            self._add_seq = max(self._add_seq, seq)
            return errs
        return self._call(run)

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests. A threaded actor may run an ``abort`` before the ``add`` sent earlier: an id unknown
        here is remembered for a minute, and an ``add`` of it is dropped."""
        def run() -> None:
            now = time.monotonic()
            known = self.engine.scheduler.requests
            for rid in request_ids:
                if rid not in known:
                    self._tombstones[rid] = now
            self.engine.scheduler.abort_requests(request_ids)
            if len(self._tombstones) > 1000:
                self._tombstones = {r: t for r, t in self._tombstones.items() if now - t < 60}
        self._call(run, wait=False)

    def set_priority(self, request_ids: list[str], priority: int) -> int:
        return self._call(lambda: sum(self.engine.set_priority(r, priority) for r in request_ids))

    def poll(self, timeout: float = 0.5) -> PollReply:
        """Everything since the last poll; waits up to ``timeout`` seconds for a step to produce something."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._events and self._dead is None and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            events, self._events = self._events, []
            return PollReply(events=events, load=self._load, stats=self._stats, last_add_seq=self._add_seq,
                             tenant_stats=self._tenant_stats, error=self._dead)

    def check(self) -> dict[str, int]:
        """Run the scheduler's invariant checks; the block counts (tests read them after a run)."""
        def run() -> dict[str, int]:
            self.engine.scheduler.check_invariants()
            kv = self.engine.kv
            return {"used_blocks": kv.num_used_blocks, "reservations": len(kv.reservations),
                    "requests": len(self.engine.scheduler.requests), "detached": len(self.engine.scheduler.detached)}
        return self._call(run)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    # ------------------------------------------------------------------ live migration (MigrationEndpoint's)
    def reserve(self, key: str, num_blocks: int) -> bool:
        return self._call(lambda: self.migration.reserve(key, num_blocks))

    @ray.method(num_returns=2)
    def read_blocks(self, request_id: str, start: int, max_bytes: int | None = None):
        return self._call(lambda: self.migration.read_blocks(request_id, start, max_bytes))

    def write(self, key: str, start: int, data) -> bool:
        return self._call(lambda: self.migration.write(key, start, data))

    @ray.method(num_returns=2)
    def freeze(self, request_id: str, start: int, num_preemptions: int | None):
        """MigrationEndpoint.freeze, plus the request's events not yet polled (handed over with the head, so they
        are not lost if this instance dies before its next poll)."""
        def run():
            head, data = self.migration.freeze(request_id, start, num_preemptions)
            if head is None:
                return None, data
            with self._cv:
                mine = [e for e in self._events if e.request_id == request_id]
                if mine:
                    self._events = [e for e in self._events if e.request_id != request_id]
            return (*head, mine), data
        return self._call(run)

    def commit(self, key: str, snapshot, start: int, data) -> bool:
        return self._call(lambda: self.migration.commit(key, snapshot, start, data))

    def resume(self, request_id: str) -> bool:
        return self._call(lambda: self.migration.resume(request_id))

    def release(self, request_id: str) -> bool:
        return self._call(lambda: self.migration.release(request_id))

    def abort_migration(self, key: str) -> None:
        self._call(lambda: self.migration.abort(key))

    # ------------------------------------------------------------------ the loop thread
    def _call(self, fn: Callable[[], Any], wait: bool = True) -> Any:
        fut: Future = Future()
        with self._cv:
            if self._dead is not None:
                raise RuntimeError(f"instance {self.instance_id} is dead: {self._dead}")
            if self._stop:
                raise RuntimeError(f"instance {self.instance_id} is shut down")
            self._commands.append((fn, fut))
            self._cv.notify_all()
        return fut.result() if wait else None

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not self._commands and not self._stop and not engine.has_unfinished_requests():
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    if self._stop:
                        for _, fut in commands:   # queued before the shutdown: their callers must not wait forever
                            fut.set_exception(RuntimeError(f"instance {self.instance_id} is shut down"))
                        break
                for fn, fut in commands:
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
                events = engine.step_events() if engine.has_unfinished_requests() else []
                load, stats = instance_load(engine, self.instance_id), engine.stats()
                now = time.monotonic()
                tenants = None
                if now - self._tenant_stats_at > 0.5 or not engine.has_unfinished_requests():
                    tenants, self._tenant_stats_at = engine.tenant_stats(), now   # linear in tenants: not every step
                with self._cv:
                    self._events.extend(events)
                    self._load, self._stats = load, stats
                    if tenants is not None:
                        self._tenant_stats = tenants
                    self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - the frontend learns it from the next poll
            log.exception("instance %s: engine loop failed", self.instance_id)
            with self._cv:
                self._dead = repr(e)
                commands, self._commands = self._commands, []
                self._cv.notify_all()
            for _, fut in commands:   # settle waiting callers
                fut.set_exception(RuntimeError(f"instance {self.instance_id} died: {e!r}"))


InstanceActor = ray.remote(InstanceWorker)

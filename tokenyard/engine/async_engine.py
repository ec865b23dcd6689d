"""asyncio front of the engine: one thread steps the LLMEngine, coroutines add, stream and abort requests.

Thread model. The LLMEngine (scheduler, KV bookkeeping, model runner) is not thread-safe, so exactly one
thread, the loop thread, ever touches it. Coroutines talk to it through a command list guarded by a
condition variable: the loop thread drains the commands between two steps, steps while there is work and
sleeps on the condition when there is none. Outputs travel back with ``loop.call_soon_threadsafe`` into one
``asyncio.Queue`` per request. The tokenizer is the one exception: it is read-only once loaded, so callers
may use ``engine.tokenizer`` from any thread (tokenyard never changes its truncation or padding).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tokenyard.engine.llm_engine import LLMEngine
from tokenyard.outputs import RequestOutput
from tokenyard.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_TENANT_STATS_EVERY_S = 0.5   # per-tenant snapshot for /metrics: linear in tenants, so not every step


class QueueFullError(RuntimeError):
    """More requests are waiting for their first token than ``max_waiting`` allows."""


class EngineUnavailableError(RuntimeError):
    """The engine is shutting down or its loop thread died; no new requests are taken."""


@dataclass
class _Stream:
    """Loop-thread bookkeeping of one request, and the asyncio queue its outputs go to."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stop_holdback: int           # chars held back while a stop string may still be forming
    sent_chars: int = 0
    sent_logprobs: int = 0
    started: bool = False        # produced its first token (no longer counts against max_waiting)

    def delta(self, o: RequestOutput) -> RequestOutput:
        """What is new in ``o`` (a request's reused, growing output) since the last delta."""
        # Hold back text that may turn out to be the start of a stop string; the engine cuts its text at a
        # stop, so what has been sent is always a prefix of the final text.
        upto = len(o.text) if o.finished else max(len(o.text) - self.stop_holdback, self.sent_chars)
        text = o.text[self.sent_chars:upto]
        self.sent_chars = upto
        lps = None
        if o.logprobs is not None:
            lps = o.logprobs[self.sent_logprobs:]
            self.sent_logprobs = len(o.logprobs)
        return RequestOutput(
            request_id=o.request_id, prompt_token_ids=o.prompt_token_ids, token_ids=list(o.new_token_ids),
            text=text, finish_reason=o.finish_reason, logprobs=lps, num_cached_tokens=o.num_cached_tokens,
            new_text=text, new_token_ids=list(o.new_token_ids), metrics=dict(o.metrics), error=o.error,
        )

    def push(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    tenant: str
    cache_salt: str | None
    stream: _Stream
    done: Callable[[BaseException | None], None] = field(repr=False)


class RequestStream:
    """Outputs of one request as an async iterator of deltas; aborts the request if the consumer leaves.

    Each yielded ``RequestOutput`` carries only what arrived since the previous one: ``text`` and
    ``new_text`` are the new text, ``token_ids``/``new_token_ids`` the new tokens, ``logprobs`` their
    logprobs. The last one has ``finish_reason`` set.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the consumer went away
            self.abort()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Abort the request (no-op once finished); its KV blocks are freed before the next step."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class StreamingEngine:
    """What the server needs of an engine, one request at a time, on top of ``add_requests`` (all or nothing):
    ``AsyncEngine`` (one engine in this process) and ``ClusterEngine`` (many, on Ray) both are one."""

    async def add_requests(self, items: list[tuple[str | list[int], SamplingParams]], *, priority: int = 0,
                           tenant: str = "default", request_ids: list[str] | None = None,
                           cache_salt: str | None = None) -> list[RequestStream]:
        raise NotImplementedError

    async def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        tenant: str = "default",
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Queue a request; returns once the engine took it. Validation errors are raised here."""
        return (await self.add_requests([(prompt, params or SamplingParams())], priority=priority, tenant=tenant,
                                        request_ids=[request_id] if request_id else None, cache_salt=cache_salt))[0]

    def stop_now(self, timeout: float = 10.0) -> None:
        """A forced exit: stop whatever engine thread runs in this process, without draining (none here)."""

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        tenant: str = "default",
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's output deltas; closing or cancelling the iterator aborts the request."""
        stream = await self.add_request(prompt, params, priority=priority, tenant=tenant, request_id=request_id,
                                        cache_salt=cache_salt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()


class AsyncEngine(StreamingEngine):
    def __init__(self, engine: LLMEngine, max_waiting: int = 256,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        """``on_failure`` is called (from the loop thread) if the engine loop dies; the server exits on it."""
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_failure = on_failure
        # Immutable facts, safe to read from any thread.
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.kv_capacity_tokens: int = engine.kv.pool.num_blocks * engine.kv.block_size
        self.scheduling_policy: str = engine.config.scheduling_policy

        self._cv = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stop = False
        self._accepting = True
        self._dead: BaseException | None = None
        self._streams: dict[str, _Stream] = {}      # loop thread only
        self._num_waiting = 0                       # guarded by _cv
        self._num_inflight = 0                      # guarded by _cv
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]
        self._stats: dict[str, float] = dict(engine.stats())
        self._tenant_stats: dict[str, tuple[float, float]] = engine.tenant_stats()
        self._tenant_stats_at = 0.0
        self._thread = threading.Thread(target=self._run, name="tokenyard-engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._thread.ident is None and not self._stop:
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None and self._accepting

    def stop_accepting(self) -> None:
        """Refuse new requests (EngineUnavailableError, a 503) and report not running; in-flight ones go on."""
        with self._cv:
            self._accepting = False

    def abort_all(self) -> None:
        """Abort every request in flight (from any thread); each stream ends with finish_reason "abort"."""
        with self._cv:
            self._commands.append(lambda: self._do_abort(list(self._streams)))
            self._cv.notify()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds, abort the rest."""
        with self._cv:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and self.num_inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def stop_now(self, timeout: float = 10.0) -> None:
        """Stop the loop after its current step and wait for the thread (a forced exit, from any thread).

        The loop thread is a daemon: left running into interpreter shutdown, a step inside a C++ op (which runs
        without the GIL) ends by taking the GIL back, which a finalizing interpreter answers by ending the thread
        in a way C++ cannot unwind: "terminate called without an active exception", SIGABRT."""
        with self._cv:
            self._accepting = False
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests
    async def add_requests(
        self,
        items: list[tuple[str | list[int], SamplingParams]],
        *,
        priority: int = 0,
        tenant: str = "default",
        request_ids: list[str] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestStream]:
        """Queue several requests all or nothing (``n`` choices of one API call)."""
        loop = asyncio.get_running_loop()
        ids = request_ids or [f"{self._id_prefix}-{next(self._ids)}" for _ in items]
        adds: list[_Add] = []
        results: list[asyncio.Future] = []
        for rid, (prompt, params) in zip(ids, items, strict=True):
            fut = loop.create_future()
            stream = _Stream(loop, asyncio.Queue(), max((len(s) for s in params.stop), default=1) - 1)
            adds.append(_Add(rid, prompt, params, priority, tenant, cache_salt, stream, _resolver(loop, fut)))
            results.append(fut)
        with self._cv:
            self._check_accepting()
            if self._num_waiting + len(items) > self.max_waiting:
                raise QueueFullError(f"the server is busy: {self._num_waiting} requests are waiting "
                                     f"(--max-waiting {self.max_waiting}); retry later")
            self._num_waiting += len(items)
            self._num_inflight += len(items)
            self._commands.append(lambda: self._do_add(adds))
            self._cv.notify()
        try:
            await asyncio.gather(*results)
        except BaseException:
            # All or nothing: a bad item (or a cancelled caller) takes the others back out.
            self.abort([a.request_id for a in adds])
            raise
        return [RequestStream(self, a.request_id, a.stream.queue) for a in adds]

    async def set_priority(self, request_ids: list[str], priority: int) -> int:
        """Change the priority of live requests from the next step; returns how many were live."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        settle = _resolver(loop, fut)

        def apply() -> None:
            if self._dead is not None:
                settle(EngineUnavailableError(f"the engine loop died: {self._dead!r}"))
                return
            try:
                n = sum(self.engine.set_priority(rid, priority) for rid in request_ids if rid in self._streams)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                settle(e)
                return
            settle(None, n)

        with self._cv:
            if self._dead is not None or self._stop:   # draining is fine: those requests still run
                raise EngineUnavailableError("the engine is not running")
            self._commands.append(apply)
            self._cv.notify()
        return await fut

    def abort(self, request_ids: str | list[str]) -> None:
        """Abort requests from any thread; the loop thread frees their blocks before its next step."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        with self._cv:
            self._commands.append(lambda: self._do_abort(ids))
            self._cv.notify()

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, float]:
        """The engine's counters as of the end of the latest step (a snapshot; safe from any thread)."""
        s = dict(self._stats)
        with self._cv:
            s["num_pending"] = self._num_waiting
            s["num_inflight"] = self._num_inflight
        return s

    def tenant_stats(self) -> dict[str, tuple[float, float]]:
        """Per tenant (service, virtual counter) as of the end of the latest step (a snapshot)."""
        return self._tenant_stats

    @property
    def num_inflight(self) -> int:
        with self._cv:
            return self._num_inflight

    # ------------------------------------------------------------------ plumbing (caller side)
    def _check_accepting(self) -> None:
        """Raise unless new requests may be queued; call with ``_cv`` held."""
        if self._dead is not None:
            raise EngineUnavailableError(f"the engine loop died: {self._dead!r}")
        if not self._accepting or self._stop:
            raise EngineUnavailableError("the server is shutting down")

    # ------------------------------------------------------------------ the loop thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not self._commands and not self._stop and not engine.has_unfinished_requests():
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stop = self._stop
                for cmd in commands:
                    cmd()
                if stop:
                    self._do_abort(list(self._streams))
                    self._stats = engine.stats()
                    break
                if engine.has_unfinished_requests():
                    self._dispatch(engine.step())
                    if not engine.has_unfinished_requests():
                        # Gone idle: a leaked or double-owned block would show now (cheap: linear in blocks).
                        engine.scheduler.check_invariants()
                self._stats = engine.stats()
                now = time.monotonic()
                if now - self._tenant_stats_at > _TENANT_STATS_EVERY_S or not engine.has_unfinished_requests():
                    self._tenant_stats, self._tenant_stats_at = engine.tenant_stats(), now
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure to every waiter
            log.exception("engine loop failed")
            self._dead = e
            with self._cv:
                commands, self._commands = self._commands, []
            for cmd in commands:  # settle pending adds so no caller waits forever
                try:
                    cmd()
                except BaseException:  # noqa: BLE001
                    pass
            for rid in list(self._streams):
                self._close(rid, EngineUnavailableError(f"the engine loop died: {e!r}"))
            if self.on_failure is not None:
                self.on_failure(e)

    def _do_add(self, adds: list[_Add]) -> None:
        for a in adds:
            try:
                if self._dead is not None:
                    raise EngineUnavailableError(f"the engine loop died: {self._dead!r}")
                self.engine.add_request(a.prompt, a.params, request_id=a.request_id, priority=a.priority,
                                        tenant=a.tenant, cache_salt=a.cache_salt)
            except Exception as e:  # noqa: BLE001 - handed to the caller, who raises it
                with self._cv:
                    self._num_waiting -= 1
                    self._num_inflight -= 1
                a.done(e)
                continue
            self._streams[a.request_id] = a.stream
            a.done(None)

    def _do_abort(self, ids: list[str]) -> None:
        outs = {o.request_id: o for o in self.engine.abort_request([i for i in ids if i in self._streams])}
        for rid in ids:
            if rid in self._streams:
                out = outs.get(rid)
                if out is not None:
                    self._deliver(out)
                else:
                    self._close(rid, None)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.request_id in self._streams:
                self._deliver(out)

    def _deliver(self, o: RequestOutput) -> None:
        """Turn the engine's (reused, growing) output into a delta and hand it to the request's queue."""
        s = self._streams[o.request_id]
        delta = s.delta(o)
        if not s.started and (o.new_token_ids or o.finished):
            s.started = True
            with self._cv:
                self._num_waiting -= 1
        s.push(delta)
        if o.finished:
            self._close(o.request_id, None)

    def _close(self, rid: str, error: BaseException | None) -> None:
        s = self._streams.pop(rid)
        with self._cv:
            if not s.started:
                self._num_waiting -= 1
            self._num_inflight -= 1
        if error is not None:
            s.push(error)


def _resolver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> Callable[..., None]:
    """A callback the loop thread calls to settle ``fut`` on its own event loop: ``settle(err, result=None)``."""

    def settle(err: BaseException | None, result: object = None) -> None:
        def apply() -> None:
            if fut.done():
                return
            if err is None:
                fut.set_result(result)
            else:
                fut.set_exception(err)

        try:
            loop.call_soon_threadsafe(apply)
        except RuntimeError:
            pass

    return settle


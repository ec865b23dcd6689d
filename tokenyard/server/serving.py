"""The two generation endpoints: request -> engine requests (one per choice) -> OpenAI response or SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenyard.engine.async_engine import RequestStream, StreamingEngine
from tokenyard.outputs import RequestOutput, TokenLogprob
from tokenyard.sampling_params import InvalidParameterError, SamplingParams
from tokenyard.sched.policies import PRIORITY_POLICIES, uses_priority
from tokenyard.server.errors import APIError, from_exception
from tokenyard.server.formatting import CompletionLogprobs, TokenStrings, chat_logprobs, sse, usage
from tokenyard.server.metrics import RequestTracker, ServerMetrics
from tokenyard.server.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


@dataclass
class _Choice:
    """What one engine request (one choice) has produced so far."""

    tracker: RequestTracker
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    completion_logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.num_tokens += len(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        self.num_cached_tokens = out.num_cached_tokens
        self.tracker.on_tokens(len(out.token_ids))
        if out.finished:
            self.finish_reason = out.finish_reason
            self.error = out.error
            self.tracker.on_finish(out.finish_reason or "stop")


@dataclass
class _Job:
    """One API call in flight: its prompts, choices and engine streams."""

    kind: str                       # "chat" | "completion"
    id: str
    created: int
    model: str
    prompt_lens: list[int]
    n: int
    choices: list[_Choice]
    streams: list[RequestStream]
    num_logprobs: int | None
    include_usage: bool
    registry: dict[str, _Job] | None = None   # the server's jobs in flight, which this one leaves on close

    def usage(self) -> dict:
        cached = sum(self.choices[p * self.n].num_cached_tokens for p in range(len(self.prompt_lens)))
        return usage(sum(self.prompt_lens), sum(c.num_tokens for c in self.choices), cached)

    def close(self) -> None:
        if self.registry is not None:
            self.registry.pop(self.id, None)
        for s in self.streams:
            s.abort()
        for c in self.choices:
            if c.finish_reason is None:
                c.tracker.on_finish("abort")


_GREEDY_BELOW = 1e-5


def _temperature(t: float | None) -> float:
    """OpenAI's default is 1; a temperature too small to divide logits by safely means greedy."""
    if t is None:
        return 1.0
    return 0.0 if t < _GREEDY_BELOW else t


class OpenAIServing:
    def __init__(self, engine: StreamingEngine, metrics: ServerMetrics, priority_bounds: tuple[int, int] | None = None,
                 salt_by_tenant: bool = True) -> None:
        """``priority_bounds``: the priorities clients may ask for (None: any). ``salt_by_tenant``: a request
        that names its tenant (``user``) and brings no ``cache_salt`` is salted by the tenant, so one tenant's
        prompts never serve, nor show up in the ``cached_tokens`` of, another's."""
        self.priority_bounds = priority_bounds
        self.salt_by_tenant = salt_by_tenant
        self.engine = engine
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.text_of = TokenStrings(engine.tokenizer)
        self.jobs: dict[str, _Job] = {}   # API calls in flight by the id their client sees

    def _check_priority_used(self) -> None:
        policy = self.engine.scheduling_policy
        if not uses_priority(policy):
            raise InvalidParameterError(
                "priority", f"this server schedules by `{policy}`, which ignores priorities; start it with "
                            f"--scheduling-policy {' or '.join(PRIORITY_POLICIES)} to use them")

    def _check_priority_bounds(self, priority: int) -> None:
        if self.priority_bounds is not None and not self.priority_bounds[0] <= priority <= self.priority_bounds[1]:
            lo, hi = self.priority_bounds
            raise InvalidParameterError("priority", f"priority must be in [{lo}, {hi}] on this server "
                                                    f"(--client-priority-range); got {priority}")

    async def set_priority(self, job_id: str, priority: int) -> dict:
        """Re-prioritize every choice of an API call in flight; 404 when it is unknown or already done."""
        self._check_priority_used()
        self._check_priority_bounds(priority)
        job = self.jobs.get(job_id)
        updated = 0
        if job is not None:
            updated = await self.engine.set_priority([s.request_id for s in job.streams], priority)
        if not updated:
            raise APIError(404, f"No request `{job_id}` is in flight (unknown, or already finished).",
                           param="id", code="request_not_found")
        return {"id": job_id, "object": "request.priority", "priority": priority, "updated": updated}

    # ------------------------------------------------------------------ endpoints
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self._check_common(req)
        self._check_fits_at_all(1, req.n)
        messages = [m.as_template_input() for m in req.messages]
        ids = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages, req.add_generation_prompt)
        job = await self._start("chat", req, [ids], req.output_limit, req.num_logprobs, arrival)
        if req.stream:
            return self._sse(job, self._chat_chunks(job))
        return await self._unless_disconnected(raw, self._chat_response(job))

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self._check_common(req)
        raw_prompts = req.prompts()
        self._check_fits_at_all(len(raw_prompts), req.n)   # before any tokenizing: a huge batch costs nothing
        prompts = [await self._tokenize(p) for p in raw_prompts]
        job = await self._start("completion", req, prompts, req.output_limit, req.num_logprobs, arrival)
        if req.stream:
            return self._sse(job, self._completion_chunks(job))
        return await self._unless_disconnected(raw, self._completion_response(job))

    # ------------------------------------------------------------------ shared steps
    def check_model(self, name: str | None) -> None:
        """404 for a model this server does not serve (None: the client did not say, which is fine)."""
        if name is not None and name != self.engine.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves "
                                f"`{self.engine.model_name}`.", param="model", code="model_not_found")

    def _check_common(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        self.check_model(req.model)
        req.check_supported()
        if req.priority != 0:
            self._check_priority_used()
        if "priority" in req.model_fields_set:   # the default (0) is the server's own choice, never out of range
            self._check_priority_bounds(req.priority)

    def _salt(self, req: ChatCompletionRequest | CompletionRequest) -> str | None:
        if req.cache_salt is not None:
            return f"salt:{req.cache_salt}"
        if self.salt_by_tenant and req.user:
            return f"tenant:{req.user}"   # explicit salts live in another namespace (see _start)
        return None

    def _check_fits_at_all(self, num_prompts: int, n: int) -> None:
        """A call with more choices than may ever wait at once can never be taken: 400, not a 503 to retry."""
        limit = self.engine.max_waiting
        if num_prompts * n > limit:
            param = "n" if num_prompts == 1 else "prompt"
            raise APIError(400, f"this call asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} "
                                f"generations; the server takes at most {limit} at once (--max-waiting)",
                           param=param)

    async def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt", "prompt must not be empty")
            return await asyncio.to_thread(self.tokenizer.encode, prompt)
        return prompt  # token ids: the engine checks them

    def _max_tokens(self, kind: str, prompt_len: int, requested: int | None) -> int:
        """The output limit, checked against the context window (OpenAI's 400 when it does not fit)."""
        limit = self.engine.max_model_len
        where = "messages" if kind == "chat" else "prompt"
        if requested is None:
            room = min(limit, self.engine.kv_capacity_tokens) - prompt_len
            if room >= 1:
                return room
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {where} "
                                f"resulted in {prompt_len} tokens. Please reduce the length of the {where}.",
                           param=where, code="context_length_exceeded")
        if prompt_len + requested > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + requested} tokens ({prompt_len} in the {where}, {requested} in the "
                                f"completion). Please reduce the length of the {where} or completion.",
                           param=where, code="context_length_exceeded")
        return requested

    async def _start(self, kind: str, req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
                     requested: int | None, num_logprobs: int | None, arrival: float) -> _Job:
        stops = req.stop_list()
        bias = req.logit_bias_ids()
        items = []
        for ids in prompts:
            max_tokens = self._max_tokens(kind, len(ids), requested)
            for i in range(req.n):
                items.append((ids, SamplingParams(
                    max_tokens=max_tokens,
                    temperature=_temperature(req.temperature),
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=-1 if req.top_k is None else req.top_k,
                    seed=None if req.seed is None else req.seed + i,
                    stop=stops,
                    ignore_eos=req.ignore_eos,
                    min_tokens=min(req.min_tokens, max_tokens),
                    logprobs=num_logprobs,
                    presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                    min_p=req.min_p or 0.0,
                    logit_bias=bias,
                    stop_token_ids=list(req.stop_token_ids or []),
                    skip_special_tokens=req.skip_special_tokens,
                )))
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        job_id = f"{prefix}-{uuid.uuid4().hex}"
        streams = await self.engine.add_requests(
            items, priority=req.priority, tenant=req.tenant, cache_salt=self._salt(req),
            request_ids=[f"{job_id}-{k}" for k in range(len(items))],
        )
        choices = [_Choice(self.metrics.tracker(req.tenant, arrival)) for _ in items]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        job = _Job(kind, job_id, int(time.time()), self.engine.model_name, [len(p) for p in prompts], req.n,
                   choices, streams, num_logprobs, include_usage, self.jobs)
        self.jobs[job_id] = job
        return job

    async def _unless_disconnected(self, raw: Request, work: Awaitable[dict]) -> Response:
        """Run a non-streaming job, but abort it (and free its KV) if the client hangs up meanwhile."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()  # the client left (or this handler was cancelled): abort the job
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        result = task.result()
        return JSONResponse(result, headers={"X-Request-Id": result["id"]})

    @staticmethod
    def _sse(job: _Job, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for c in chunks:
                    yield c
            finally:  # the client left (cancelled) or the stream ended: nothing may keep running
                job.close()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          "X-Request-Id": job.id})

    @staticmethod
    async def _merged(job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas of all the job's choices as they come; aborts whatever is unfinished on exit."""
        if len(job.streams) == 1:
            try:
                async for out in job.streams[0]:
                    yield 0, out
            finally:
                job.close()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - re-raised on the consumer's side
                queue.put_nowait((i, e))
            queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(job.streams)]
        try:
            left = len(tasks)
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            job.close()

    async def _collect(self, job: _Job) -> None:
        async for i, out in self._merged(job):
            job.choices[i].add(out)
        failed = [c.error for c in job.choices if c.finish_reason == "abort" and c.error]
        if failed:
            raise APIError(500, f"the engine could not complete the request: {failed[0]}", "server_error")
        if any(c.finish_reason == "abort" for c in job.choices):
            raise APIError(503, "the request was aborted by the server (shutting down)", "server_error")

    # ------------------------------------------------------------------ chat
    async def _chat_response(self, job: _Job) -> dict:
        await self._collect(job)
        choices = []
        for i, c in enumerate(job.choices):
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": chat_logprobs(c.logprobs, self.text_of) if job.num_logprobs is not None else None,
                "finish_reason": c.finish_reason,
            })
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
                "choices": choices, "usage": job.usage(), "system_fingerprint": None}

    async def _chat_chunks(self, job: _Job) -> AsyncIterator[str]:
        def chunk(choices: list[dict]) -> str:
            body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                    "choices": choices, "system_fingerprint": None}
            if job.include_usage:
                body["usage"] = None
            return sse(body)

        for i in range(len(job.choices)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for frame in self._stream(job, lambda i, out, c: chunk([{
            "index": i,
            "delta": {"content": out.text} if out.text else {},
            "logprobs": chat_logprobs(out.logprobs, self.text_of) if out.logprobs else None,
            "finish_reason": out.finish_reason,
        }])):
            yield frame

    # ------------------------------------------------------------------ completions
    async def _completion_response(self, job: _Job) -> dict:
        await self._collect(job)
        choices = []
        for i, c in enumerate(job.choices):
            lps = c.completion_logprobs.chunk(c.logprobs, self.text_of) if job.num_logprobs is not None else None
            choices.append({"index": i, "text": "".join(c.text), "logprobs": lps, "finish_reason": c.finish_reason})
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": choices, "usage": job.usage(), "system_fingerprint": None}

    async def _completion_chunks(self, job: _Job) -> AsyncIterator[str]:
        def frame(i: int, out: RequestOutput, c: _Choice) -> str:
            lps = None
            if job.num_logprobs is not None and out.logprobs:
                lps = c.completion_logprobs.chunk(out.logprobs, self.text_of)
            body = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                    "choices": [{"index": i, "text": out.text, "logprobs": lps, "finish_reason": out.finish_reason}],
                    "system_fingerprint": None}
            if job.include_usage:
                body["usage"] = None
            return sse(body)

        async for f in self._stream(job, frame):
            yield f

    # ------------------------------------------------------------------ streaming core
    async def _stream(self, job: _Job, frame) -> AsyncIterator[str]:
        """SSE frames for each delta, then the usage chunk if asked, then [DONE]. Errors become an error event."""
        try:
            async for i, out in self._merged(job):
                c = job.choices[i]
                c.add(out)
                if out.text or out.logprobs or out.finished:
                    yield frame(i, out, c)
                if out.error:
                    raise APIError(500, f"the engine could not complete the request: {out.error}", "server_error")
                if out.finish_reason == "abort":   # not the client's doing (it would not be reading): shutdown
                    raise APIError(503, "the request was aborted by the server (shutting down)", "server_error",
                                   code="engine_unavailable")
            if job.include_usage:
                kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
                yield sse({"id": job.id, "object": kind, "created": job.created, "model": job.model,
                           "choices": [], "usage": job.usage(), "system_fingerprint": None})
        except Exception as e:  # noqa: BLE001 - headers are out; the error must travel in the stream
            yield sse(from_exception(e).body())
        yield sse("[DONE]")

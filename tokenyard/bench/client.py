"""Async HTTP side of the benchmark: send streaming requests at their arrival times and time every chunk.

One httpx.AsyncClient for the whole run, its connection pool sized to the concurrency limit. Each request
fills one RequestRecord; nothing here raises for a failed request, its record says what went wrong.
Conversations (chains) send turn i+1 right after turn i completes, its prompt extended by the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from tokenyard.bench.prompts import request_body
from tokenyard.bench.records import RequestRecord
from tokenyard.bench.workload import RequestSpec

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class BenchError(Exception):
    """A failure that stops the benchmark before it starts (unreachable server, no model); one line."""


@dataclass
class Target:
    base_url: str
    endpoint: str = "completions"       # or "chat"
    model: str | None = None
    api_key: str | None = None
    ignore_eos: bool = True
    request_timeout: float = 600.0      # seconds without a byte from the server
    max_concurrency: int | None = None
    # (every seconds, priorities): re-prioritize the requests in flight while the run goes on
    priority_churn_s: tuple[float, list[int]] | None = None
    priority_changes: int = 0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def make_client(target: Target) -> httpx.AsyncClient:
    n = target.max_concurrency
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    timeout = httpx.Timeout(target.request_timeout, connect=min(10.0, target.request_timeout), pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=target.headers)


def _error_message(resp: httpx.Response) -> str:
    """The OpenAI-shaped error's message, else the start of the body."""
    try:
        body = resp.json()
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])
            if isinstance(err, str):
                return err
            if "detail" in body:
                return str(body["detail"])
    except (ValueError, UnicodeDecodeError):
        pass
    text = resp.text.strip().replace("\n", " ")
    return text[:200] or resp.reason_phrase


def describe(e: BaseException, base_url: str) -> tuple[str, str]:
    """(kind, one-line message) for an exception from httpx."""
    if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
        return "connect", f"cannot connect to {base_url}: {e or type(e).__name__}"
    if isinstance(e, httpx.TimeoutException):
        return "timeout", f"no answer within the timeout ({type(e).__name__})"
    if isinstance(e, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "disconnected", f"the connection broke mid-request: {e or type(e).__name__}"
    if isinstance(e, httpx.HTTPError):
        return "http_client", f"{type(e).__name__}: {e}"
    return "client_error", f"{type(e).__name__}: {e}"


async def list_models(client: httpx.AsyncClient, base_url: str) -> list[str]:
    """GET /v1/models; a BenchError with one clear line when the server cannot be reached or answers badly."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(url, timeout=10.0)
    except httpx.HTTPError as e:
        raise BenchError(describe(e, base_url)[1]) from None
    if resp.status_code != 200:
        raise BenchError(f"GET {url} answered HTTP {resp.status_code}: {_error_message(resp)}")
    try:
        return [str(m["id"]) for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"GET {url} did not return an OpenAI model list") from None


async def send(client: httpx.AsyncClient, target: Target, body: dict, rec: RequestRecord, t0: float,
               live: dict[int, str] | None = None) -> None:
    """POST one streaming request and fill ``rec`` (times relative to ``t0``, a perf_counter reading).
    ``live``: record index -> the server's request id (X-Request-Id) while the response streams."""
    start = time.perf_counter()
    rec.sent, rec.send_s = True, start - t0
    done = False
    finished_at: float | None = None
    usage: dict | None = None
    chat = target.endpoint == "chat"
    try:
        async with client.stream("POST", target.url, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                rec.fail(f"http_{resp.status_code}", _error_message(resp), time.perf_counter() - start)
                return
            if live is not None and resp.headers.get("x-request-id"):
                live[rec.index] = resp.headers["x-request-id"]
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event:/id: fields
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                try:
                    obj = json.loads(data)
                except ValueError:
                    rec.fail("malformed_stream", f"not JSON: {data[:80]!r}", now - start)
                    return
                if not isinstance(obj, dict):
                    rec.fail("malformed_stream", f"not a JSON object: {data[:80]!r}", now - start)
                    return
                if obj.get("error") is not None:
                    err = obj["error"]
                    msg = err.get("message") if isinstance(err, dict) else str(err)
                    rec.fail("stream_error", str(msg), now - start)
                    return
                for c in obj.get("choices") or ():
                    text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    if text:
                        if rec.ttft_s is None:
                            rec.ttft_s = now - start
                        rec.token_s.append(now - start)
                        rec.text += text
                    if c.get("finish_reason"):
                        rec.finish_reason = c["finish_reason"]
                        finished_at = now
                if obj.get("usage"):
                    usage = obj["usage"]
        end = time.perf_counter()
        if not done:
            rec.fail("malformed_stream", "the stream ended without [DONE]", end - start)
            return
        rec.latency_s = end - start
        if rec.ttft_s is None:  # every token decoded to nothing (special tokens): first sign of output
            rec.ttft_s = (finished_at or end) - start
        if isinstance(usage, dict):
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.output_tokens = int(usage.get("completion_tokens") or 0)
        else:
            rec.output_tokens = len(rec.token_s)
    except asyncio.CancelledError:
        rec.fail("cancelled", "interrupted before the response ended", time.perf_counter() - start)
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes the record's error, never the run's
        kind, msg = describe(e, target.base_url)
        rec.fail(kind, msg, time.perf_counter() - start)
    finally:
        if live is not None:
            live.pop(rec.index, None)


async def churn_priorities(client: httpx.AsyncClient, target: Target, live: dict[int, str],
                           stop: asyncio.Event, seed: int = 0) -> None:
    """Every ``target.priority_churn_s[0]`` seconds give each request in flight a new priority, drawn from
    ``target.priority_churn_s[1]``. A request that finished meanwhile answers 404; that is not an error."""

    every, choices = target.priority_churn_s
    rng = random.Random(seed)
    base = target.base_url.rstrip("/")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        for rid in list(live.values()):
            with contextlib.suppress(httpx.HTTPError):
                resp = await client.post(f"{base}/v1/requests/{rid}/priority",
                                         json={"priority": rng.choice(choices)}, timeout=10.0)
                if resp.status_code == 200:
                    target.priority_changes += 1


def _prompt_for(target: Target, spec: RequestSpec, text: str, history: list[dict] | str | None):
    """The prompt of one turn: its text alone, or the conversation so far plus it."""
    if target.endpoint == "chat":
        return [*(history or []), {"role": "user", "content": text}]
    return f"{history}\n{text}" if history else text


def _extend(target: Target, prompt, answer: str):
    if target.endpoint == "chat":
        return [*prompt, {"role": "assistant", "content": answer}]
    return prompt + answer


async def run_chains(target: Target, chains: Sequence[Sequence[RequestSpec]], texts: dict[int, str],
                     records: dict[int, RequestRecord], on_done: Callable[[RequestRecord], None] | None = None,
                     client: httpx.AsyncClient | None = None, give_up_after: int = 10,
                     on_sent: Callable[[RequestRecord], None] | None = None) -> str | None:
    """Send every chain at its arrival time. Times in the records are relative to the moment this starts.

    After ``give_up_after`` connection failures in a row (no success between them) the server is taken to be
    gone: nothing more is sent, and the reason comes back (None when the run went to the end).
    """
    sem = asyncio.Semaphore(target.max_concurrency) if target.max_concurrency else None
    own = client is None
    client = client or make_client(target)
    stop = asyncio.Event()
    live: dict[int, str] = {}
    state = {"connect_failures": 0, "reason": None}
    t0 = time.perf_counter()

    def account(rec: RequestRecord) -> None:
        if rec.error_kind == "connect":
            state["connect_failures"] += 1
            if give_up_after and state["connect_failures"] >= give_up_after and not stop.is_set():
                state["reason"] = f"{give_up_after} connection failures in a row; sent nothing more"
                stop.set()
        elif rec.ok:
            state["connect_failures"] = 0

    async def one(chain: Sequence[RequestSpec]) -> None:
        delay = t0 + (chain[0].arrival_s or 0.0) - time.perf_counter()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        history = None
        for k, spec in enumerate(chain):
            if stop.is_set():
                return
            rec = records[spec.index]
            prompt = _prompt_for(target, spec, texts[spec.index], history)
            body = request_body(target.endpoint, target.model, prompt, spec.output_len, target.ignore_eos,
                                spec.tenant, spec.priority)
            if sem is not None:
                async with sem:
                    if stop.is_set():
                        return
                    if on_sent is not None:
                        on_sent(rec)
                    await send(client, target, body, rec, t0, live)
            else:
                if on_sent is not None:
                    on_sent(rec)
                await send(client, target, body, rec, t0, live)
            account(rec)
            if on_done is not None:
                on_done(rec)
            if not rec.ok:
                for later in chain[k + 1:]:
                    records[later.index].fail("skipped", f"turn {spec.turn} of its conversation failed")
                return
            history = _extend(target, prompt, rec.text)

    churn_done = asyncio.Event()
    churn = asyncio.create_task(churn_priorities(client, target, live, churn_done)) \
        if target.priority_churn_s is not None else None
    try:
        await asyncio.gather(*(one(c) for c in chains))
    finally:
        churn_done.set()
        if churn is not None:
            await churn
        if own:
            await client.aclose()
    return state["reason"]

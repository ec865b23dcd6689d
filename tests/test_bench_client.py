"""The benchmark's HTTP client against scripted responses (httpx.MockTransport): SSE parsing and error kinds."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tokenyard.bench.client import BenchError, Target, list_models, run_chains, send
from tokenyard.bench.records import RequestRecord
from tokenyard.bench.workload import RequestSpec


def sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def completion_chunk(text, finish=None):
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def chat_chunk(content=None, finish=None, role=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def run_one(handler, endpoint="completions") -> RequestRecord:
    target = Target("http://bench.test", endpoint=endpoint)
    rec = RequestRecord(0, 5, 3)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await send(client, target, {"stream": True}, rec, 0.0)

    asyncio.run(go())
    return rec


def test_completion_stream():
    body = sse(completion_chunk(" a"), completion_chunk(" b"), completion_chunk(" c", "length"), USAGE, "[DONE]")
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    rec = run_one(handler)
    assert seen["url"] == "http://bench.test/v1/completions"
    assert rec.ok and rec.error_kind is None
    assert rec.text == " a b c" and rec.finish_reason == "length"
    assert (rec.prompt_tokens, rec.output_tokens) == (5, 3)
    assert len(rec.token_s) == 3 and rec.ttft_s == rec.token_s[0] <= rec.latency_s
    assert rec.to_json()["itl_s"] == [pytest.approx(rec.token_s[1] - rec.token_s[0], abs=1e-6),
                                      pytest.approx(rec.token_s[2] - rec.token_s[1], abs=1e-6)]


def test_chat_stream_role_chunk_is_not_a_token_and_without_usage_chunks_are_counted():
    body = sse(chat_chunk("", role="assistant"), chat_chunk("x"), chat_chunk(None), chat_chunk("y", "length"),
               "[DONE]")
    rec = run_one(lambda r: httpx.Response(200, content=body), endpoint="chat")
    assert rec.ok and rec.text == "xy" and rec.output_tokens == 2 and rec.prompt_tokens is None
    assert len(rec.token_s) == 2


@pytest.mark.parametrize("response, kind, words", [
    (httpx.Response(400, json={"error": {"message": "prompt too long", "type": "invalid_request_error"}}),
     "http_400", "prompt too long"),
    (httpx.Response(502, text="<html>bad gateway</html>"), "http_502", "bad gateway"),
    (httpx.Response(200, content=sse(completion_chunk("a"), "{not json")), "malformed_stream", "not JSON"),
    (httpx.Response(200, content=sse(completion_chunk("a"), [1, 2])), "malformed_stream", "not a JSON object"),
    (httpx.Response(200, content=sse(completion_chunk("a"))), "malformed_stream", "without [DONE]"),
    (httpx.Response(200, content=sse(completion_chunk("a"), {"error": {"message": "engine died"}}, "[DONE]")),
     "stream_error", "engine died"),
])
def test_error_kinds(response, kind, words):
    rec = run_one(lambda r: response)
    assert not rec.ok and rec.error_kind == kind and words in rec.error
    assert rec.sent and rec.latency_s is not None


@pytest.mark.parametrize("exc, kind", [
    (httpx.ConnectError("Connection refused"), "connect"),
    (httpx.ReadTimeout("slow"), "timeout"),
    (httpx.RemoteProtocolError("peer closed connection"), "disconnected"),
])
def test_transport_failures(exc, kind):
    def handler(request):
        raise exc

    rec = run_one(handler)
    assert rec.error_kind == kind and not rec.ok


def test_list_models_errors():
    async def models(handler):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await list_models(client, "http://bench.test")

    assert asyncio.run(models(lambda r: httpx.Response(200, json={"data": [{"id": "m1"}, {"id": "m2"}]}))) == [
        "m1", "m2"]
    with pytest.raises(BenchError, match="HTTP 401: bad key"):
        asyncio.run(models(lambda r: httpx.Response(401, json={"error": {"message": "bad key"}})))
    with pytest.raises(BenchError, match="did not return an OpenAI model list"):
        asyncio.run(models(lambda r: httpx.Response(200, json={"models": []})))

    def refuse(r):
        raise httpx.ConnectError("Connection refused")

    with pytest.raises(BenchError, match="cannot connect to http://bench.test"):
        asyncio.run(models(refuse))


def test_chains_concurrency_history_and_skips():
    state = {"now": 0, "max": 0, "bodies": []}

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        state["bodies"].append(body)
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        if body["messages"][-1]["content"] == "boom":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        return httpx.Response(200, content=sse(chat_chunk("ans"), USAGE, "[DONE]"))

    target = Target("http://bench.test", endpoint="chat", model="m", max_concurrency=2)
    specs = [RequestSpec(i, 5, 3, 0.0) for i in range(6)]
    conv = [RequestSpec(6, 5, 3, 0.0, conversation=0, turn=0), RequestSpec(7, 5, 3, None, conversation=0, turn=1)]
    bad = [RequestSpec(8, 5, 3, 0.0, conversation=1, turn=0), RequestSpec(9, 5, 3, None, conversation=1, turn=1)]
    texts = {i: f"q{i}" for i in range(10)}
    texts[8] = "boom"
    records = {i: RequestRecord(i, 5, 3) for i in range(10)}
    done = []

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await run_chains(target, [[s] for s in specs] + [conv, bad], texts, records, done.append, client)

    asyncio.run(go())
    assert state["max"] <= 2
    assert all(records[i].ok for i in range(8)) and len(done) == 9
    turn2 = next(b for b in state["bodies"] if b["messages"][-1]["content"] == "q7")
    assert turn2["messages"] == [{"role": "user", "content": "q6"}, {"role": "assistant", "content": "ans"},
                                 {"role": "user", "content": "q7"}]
    assert records[8].error_kind == "http_500"
    assert records[9].error_kind == "skipped" and not records[9].sent


def test_gives_up_after_connection_failures_in_a_row():
    def refuse(request):
        raise httpx.ConnectError("Connection refused")

    target = Target("http://bench.test", max_concurrency=1)
    specs = [RequestSpec(i, 5, 3, 0.001 * i) for i in range(30)]
    records = {i: RequestRecord(i, 5, 3) for i in range(30)}

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
            return await run_chains(target, [[s] for s in specs], {i: "x" for i in range(30)}, records, None,
                                    client, give_up_after=10)

    reason = asyncio.run(go())
    assert reason and "10 connection failures in a row" in reason
    assert sum(r.sent for r in records.values()) == 10
    assert all(r.error_kind == "connect" for r in records.values() if r.sent)

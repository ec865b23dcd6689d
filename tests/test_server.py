"""The OpenAI-compatible server, run as a real process and driven with the official openai client and httpx."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import re
import signal
import time

import httpx
import openai
import pytest

from tests.servers import Server
from tokenyard.cli import build_parser, engine_config
from tokenyard.config import EngineConfig

MAX_BODY = 4096


# --------------------------------------------------------------------------- server processes


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    server = Server(["--model", str(tiny_llama_dir), "--num-kv-blocks", "128", "--max-num-seqs", "16",
                     "--max-waiting", "16", "--max-body-bytes", str(MAX_BODY), "--check-invariants"],
                    tmp_path_factory.mktemp("logs") / "tiny.log")
    yield server
    assert server.stop() == 0, server.log.read_text()


@pytest.fixture(scope="module")
def client(tiny):
    return openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def hf_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _stream_chat(client, **kw) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def _stream_completion(client, **kw) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


MSG = [{"role": "user", "content": "w5 w6 w7"}]


# --------------------------------------------------------------------------- happy paths
def test_health_and_models(tiny, model):
    assert httpx.get(f"{tiny.url}/health").json() == {"status": "ok"}
    cards = httpx.get(f"{tiny.url}/v1/models").json()
    assert cards["object"] == "list" and [c["id"] for c in cards["data"]] == [model]


def test_chat_usage_counts_tokens(client, model, hf_tok):
    r = client.chat.completions.create(model=model, messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.role == "assistant" and c.message.content
    prompt = hf_tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(hf_tok.encode(prompt, add_special_tokens=False))
    assert r.usage.completion_tokens == 6 == len(c.logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    assert "".join(t.token for t in c.logprobs.content) == c.message.content.replace(" ", "")


def test_tiny_temperature_is_greedy(client, model):
    kw = dict(model=model, prompt="w8 w9", max_tokens=4, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    assert client.completions.create(temperature=1e-40, **kw).choices[0].text == greedy


def test_max_completion_tokens(client, model):
    r = client.chat.completions.create(model=model, messages=MSG, max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_completion_usage_and_logprobs(client, model):
    r = client.completions.create(model=model, prompt="w9 w10 w11 w12", max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 5
    assert len(c.logprobs.tokens) == 5 and all(len(t) == 3 for t in c.logprobs.top_logprobs)
    # token ids work as a prompt too
    r2 = client.completions.create(model=model, prompt=[9, 10, 11, 12], max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == c.text


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_stream_equals_non_stream_with_seed(client, model, api):
    kw = dict(model=model, max_tokens=8, temperature=0.9, seed=1234, extra_body={"ignore_eos": True})
    if api == "chat":
        full = client.chat.completions.create(messages=MSG, **kw)
        texts, reasons, usage = _stream_chat(client, messages=MSG, **kw)
        want = full.choices[0].message.content
    else:
        full = client.completions.create(prompt="w20 w21", **kw)
        texts, reasons, usage = _stream_completion(client, prompt="w20 w21", **kw)
        want = full.choices[0].text
    assert texts == {0: want} and reasons == {0: "length"}
    assert usage.completion_tokens == full.usage.completion_tokens == 8
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_n_choices_stream_and_not(client, model):
    kw = dict(model=model, max_tokens=6, temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(messages=MSG, **kw)
    assert sorted(c.index for c in full.choices) == [0, 1]
    assert full.usage.completion_tokens == 12
    texts, reasons, usage = _stream_chat(client, messages=MSG, **kw)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert reasons == {0: "length", 1: "length"} and usage.completion_tokens == 12
    # seeds are seed + i: choice 1 of seed 7 is choice 0 of seed 8
    one = client.chat.completions.create(messages=MSG, **{**kw, "n": 1, "seed": 8})
    assert one.choices[0].message.content == texts[1]


def test_stop_strings(client, model):
    kw = dict(model=model, prompt="w40 w41 w42", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    words = client.completions.create(**kw).choices[0].text.split()
    assert len(words) >= 6
    stop = f"{words[3]} {words[4]}"  # spans two tokens: streaming must hold the first one back
    want = " ".join(words[:3])
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert (cut.text.strip(), cut.finish_reason) == (want, "stop")
    texts, reasons, _ = _stream_completion(client, stop=stop, **kw)
    assert texts == {0: cut.text} and reasons == {0: "stop"}


def test_common_client_bookkeeping_fields_are_accepted(tiny):
    body = {"messages": MSG, "max_tokens": 2, "store": False, "metadata": {"app": "x"}, "service_tier": "auto",
            "parallel_tool_calls": True, "tool_choice": "auto", "modalities": ["text"], "prompt_cache_key": "k",
            "stop_token_ids": [2], "skip_special_tokens": False, "add_generation_prompt": True}
    r = httpx.post(f"{tiny.url}{CHAT}", json=body, timeout=30)
    assert r.status_code == 200, r.text


def test_extreme_sampling_values_found_by_the_fuzzer_answer_200(tiny):
    body = {"prompt": "0", "max_tokens": 3, "temperature": 0.0, "top_p": 5e-324, "repetition_penalty": 0.01,
            "logprobs": 5, "min_tokens": 3, "logit_bias": {"2": -100}}
    r = httpx.post(f"{tiny.url}{COMP}", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert all(v >= -9999.0 for v in r.json()["choices"][0]["logprobs"]["token_logprobs"])


def test_sampling_knobs_are_honoured(client, model):
    kw = dict(model=model, prompt="w40 w41 w42", max_tokens=6, temperature=0)
    plain = client.completions.create(**kw).choices[0]
    forced = client.completions.create(**kw, logit_bias={"77": 100}).choices[0]
    assert forced.text.split() == ["w77"] * 6 and forced.text != plain.text
    varied = client.completions.create(**kw, frequency_penalty=2.0, logit_bias={"77": 1.5},
                                       extra_body={"repetition_penalty": 1.2, "min_p": 0.1}).choices[0]
    assert varied.finish_reason in ("length", "stop")


def test_cache_salt_keeps_prompts_out_of_other_salts_cache(client, model):
    prompt = " ".join(f"w{30 + i}" for i in range(40))
    def cached(**extra) -> int:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=1, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens
    cached(cache_salt="alice")
    assert cached(cache_salt="mallory") == 0 and cached() == 0 and cached(cache_salt="alice") > 0


def test_named_tenants_do_not_share_prefix_cache_by_default(client, model):
    """No cached-token oracle across tenants: a named tenant's prompts are salted by its name."""
    prompt = " ".join(f"w{90 + i}" for i in range(40))
    def cached(user: str) -> int:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=1, user=user)
        return r.usage.prompt_tokens_details.cached_tokens
    assert cached("alice-secret") == 0
    assert cached("mallory") == 0 and cached("alice-secret") > 0


def test_api_key_middleware_can_leave_metrics_public():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from tokenyard.server.middleware import OPEN_PATHS, PUBLIC_PATHS, APIKeyMiddleware

    app = Starlette(routes=[Route(p, lambda _: PlainTextResponse("ok")) for p in ("/metrics", "/health", "/v1/x")])
    strict = TestClient(APIKeyMiddleware(app, "k", OPEN_PATHS))
    public = TestClient(APIKeyMiddleware(app, "k", PUBLIC_PATHS))    # --public-metrics
    assert [strict.get(p).status_code for p in ("/metrics", "/health", "/v1/x")] == [401, 200, 401]
    assert [public.get(p).status_code for p in ("/metrics", "/health", "/v1/x")] == [200, 200, 401]


def test_user_accepted_and_priority_refused_under_fcfs(tiny, client, model):
    r = client.chat.completions.create(model=model, messages=MSG, max_tokens=2, user="alice",
                                       extra_body={"priority": 0, "top_k": 5})
    assert r.choices[0].finish_reason in ("length", "stop")
    m = tiny.metrics()
    assert any(k.startswith("tokenyard_requests_total{") and 'tenant="alice"' in k for k in m)
    with pytest.raises(openai.BadRequestError) as e:   # fcfs ignores priorities: say so instead of silence
        client.chat.completions.create(model=model, messages=MSG, max_tokens=2, extra_body={"priority": 3})
    assert e.value.body["param"] == "priority" and "--scheduling-policy" in e.value.body["message"]
    r = httpx.post(f"{tiny.url}/v1/requests/chatcmpl-x/priority", json={"priority": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


# --------------------------------------------------------------------------- errors
def _post(url: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json", **(headers or {})})


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
CTX = "context_length_exceeded"
BAD = [  # path, body, status, param, code (None: not checked)
    (CHAT, "{not json", 400, None, None),
    (CHAT, "[1, 2]", 400, None, None),
    (CHAT, {"max_tokens": 3}, 400, "messages", None),
    (CHAT, {"messages": "hello"}, 400, "messages", None),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content", None),
    (CHAT, {"messages": [{"role": "robot", "content": "w5"}]}, 400, "messages.0.role", None),
    (CHAT, {"messages": MSG, "temperature": -0.5}, 400, "temperature", None),
    (CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature", None),
    (CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens", None),
    (CHAT, {"messages": MSG, "max_tokens": 2.5}, 400, "max_tokens", None),
    (CHAT, {"messages": MSG, "seed": 2**64}, 400, "seed", None),
    (CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p", None),
    (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p", None),
    (CHAT, {"messages": MSG, "n": 0}, 400, "n", None),
    (CHAT, {"messages": MSG, "priority": "high"}, 400, "priority", None),
    (CHAT, {"messages": MSG, "presence_penalty": 3}, 400, "presence_penalty", None),
    (CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    (CHAT, {"messages": MSG, "logit_bias": {"5": 200}}, 400, "logit_bias", None),
    (CHAT, {"messages": MSG, "repetition_penalty": 0}, 400, "repetition_penalty", None),
    (CHAT, {"messages": MSG, "mystery_knob": 1}, 400, "mystery_knob", None),
    (CHAT, {"messages": MSG, "tool_choice": {"type": "function"}}, 400, "tool_choice", None),
    (CHAT, {"messages": MSG, "reasoning_effort": "low"}, 400, "reasoning_effort", None),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"x": 1}}, 400, "chat_template_kwargs", None),
    (COMP, {"prompt": "w5", "include_stop_str_in_output": True}, 400, "include_stop_str_in_output", None),
    (COMP, {"prompt": "w5", "stop": [f"w{i}" for i in range(17)]}, 400, "stop", None),
    (CHAT, {"messages": MSG, "max_tokens": "16"}, 400, "max_tokens", None),
    (CHAT, "", 400, None, None),                          # no body at all
    (CHAT, {"messages": MSG, "stream": "yes"}, 400, "stream", None),
    (CHAT, {"messages": MSG, "logprobs": "yes"}, 400, "logprobs", None),
    (COMP, {"prompt": [True, 5]}, 400, "prompt", None),
    (CHAT, {"messages": [{"role": "user", "content": "w5 \ud800"}]}, 400, "messages", None),
    (COMP, {"prompt": "w5 \ud800"}, 400, "prompt", None),
    (COMP, {"prompt": "w5", "functions": []}, 400, "functions", None),
    (CHAT, {"messages": MSG, "priority": 2**40}, 400, "priority", None),
    (CHAT, {"messages": MSG, "stop": [""]}, 400, "stop", None),
    (CHAT, {"messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    (CHAT, {"messages": MSG, "max_tokens": 300}, 400, "messages", CTX),
    (COMP, {"prompt": " ".join(["w7"] * 250), "max_tokens": 10}, 400, "prompt", CTX),
    (COMP, {"prompt": " ".join(["w7"] * 300)}, 400, "prompt", None),
    (COMP, {"prompt": ""}, 400, "prompt", None),
    (COMP, {"prompt": [999]}, 400, "prompt", None),
    (COMP, {"prompt": "w5", "logprobs": 99}, 400, "logprobs", None),
    (CHAT, {"model": "gpt-4o", "messages": MSG}, 404, "model", "model_not_found"),
    (COMP, {"model": "gpt-4o", "prompt": "w5"}, 404, "model", "model_not_found"),
    (COMP, {"prompt": "w5 " * MAX_BODY}, 413, None, "request_too_large"),
    (COMP, {"prompt": [[5]] * 300}, 400, "prompt", None),   # more than --max-waiting: refused before expanding
    (CHAT, {"messages": MSG, "n": 17}, 400, "n", None),    # more at once than --max-waiting: can never fit
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{b[2]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_openai_errors(tiny, path, body, status, param, code):
    r = _post(tiny.url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if code == CTX:
        assert "maximum context length is 256 tokens" in err["message"]


def test_chunked_body_over_limit_is_413(tiny):
    def chunks():
        for _ in range(MAX_BODY // 100 + 2):
            yield b" " * 100
        yield b'{"prompt": "w5"}'

    r = httpx.post(f"{tiny.url}{COMP}", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_openai_client_raises_typed_errors(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MSG, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)


# --------------------------------------------------------------------------- abuse
def test_burst_of_bad_requests_and_disconnects_leaves_no_kv(tiny, client, model):
    aborted_before = sum(v for k, v in tiny.metrics().items() if 'finish_reason="abort"' in k)

    def bad(i: int) -> int:
        return _post(tiny.url, *BAD[i % len(BAD)][:2]).status_code

    def disconnect_mid_stream(i: int) -> str:
        body = {"prompt": f"w{30 + i} w31", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{tiny.url}{COMP}", json=body, timeout=10) as r:
            assert r.status_code == 200
            return next(r.iter_text())  # read one chunk, then hang up

    def non_stream_timeout(i: int) -> str:
        body = {"prompt": f"w{50 + i}", "max_tokens": 250, "ignore_eos": True}
        try:
            httpx.post(f"{tiny.url}{COMP}", json=body, timeout=0.2)
        except httpx.TimeoutException:
            return "timed out"
        return "answered"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(bad, range(30)))
        streams = [pool.submit(disconnect_mid_stream, i) for i in range(8)]
        posts = [pool.submit(non_stream_timeout, i) for i in range(2)]
        first_chunks = [f.result() for f in streams]
        timed_out = sum(f.result() == "timed out" for f in posts)
    assert all(400 <= s < 600 for s in statuses)
    assert all(c.startswith("data: ") for c in first_chunks)

    deadline = time.monotonic() + 10
    while True:
        m = tiny.metrics()
        if m["tokenyard_kv_blocks_used"] == 0 and m["tokenyard_num_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, f"KV still in use: {m['tokenyard_kv_blocks_used']}"
        time.sleep(0.05)
    aborted = sum(v for k, v in m.items() if 'finish_reason="abort"' in k) - aborted_before
    assert aborted >= 8 + timed_out, "requests of clients that left should be aborted, not run to the end"
    assert m["tokenyard_num_requests_waiting"] == 0 and m["tokenyard_num_requests_pending"] == 0
    r = client.chat.completions.create(model=model, messages=MSG, max_tokens=3)
    assert r.choices[0].message.content is not None


def test_metrics_exposed(tiny):
    m = tiny.metrics()
    for name in ("tokenyard_time_to_first_token_seconds_count", "tokenyard_inter_token_latency_seconds_count",
                 "tokenyard_e2e_request_latency_seconds_count", "tokenyard_kv_blocks_free",
                 "tokenyard_num_requests_swapped", "tokenyard_preemptions_total",
                 "tokenyard_prefix_cache_hit_tokens_total", "tokenyard_prompt_tokens_total",
                 "tokenyard_generation_tokens_total"):
        assert name in m, name
    assert m["tokenyard_time_to_first_token_seconds_count"] > 0 and m["tokenyard_generation_tokens_total"] > 0


def test_context_switch_metrics_under_swap_preemption(tiny_llama_dir, tmp_path):
    """A pool too small for the batch, swap preemption, priorities changed over HTTP while requests stream: the
    swap counters move, bytes are whole blocks, and copies group blocks (fewer copies than blocks)."""
    server = Server(["--model", str(tiny_llama_dir), "--num-kv-blocks", "24", "--block-size", "4",
                     "--preemption-mode", "swap", "--scheduling-policy", "priority", "--max-num-seqs", "8",
                     "--check-invariants"], tmp_path / "swap.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        prompts = [[3 + (7 * i + k) % 200 for k in range(24 + 2 * i)] for i in range(6)]

        def one(i: int) -> str:
            with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
                "model": model, "prompt": prompts[i], "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "stream": True, "priority": i % 3,
            }) as resp:
                rid = resp.headers["x-request-id"]
                for k, _ in enumerate(resp.iter_lines()):
                    if k == 3:   # mid-stream: the first become the most urgent
                        httpx.post(f"{server.url}/v1/requests/{rid}/priority", json={"priority": 0 if i < 3 else 2})
            return rid

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(one, range(6)))
        m = server.metrics()
        assert m["tokenyard_preemptions_total"] > 0
        out_b, in_b, copies = (m["tokenyard_swap_out_bytes_total"], m["tokenyard_swap_in_bytes_total"],
                               m["tokenyard_swap_copies_total"])
        cfg = json.loads((tiny_llama_dir / "config.json").read_text())
        block_bytes = 2 * cfg["num_hidden_layers"] * 4 * cfg["num_key_value_heads"] * \
            (cfg["hidden_size"] // cfg["num_attention_heads"]) * 4
        assert out_b > 0 and in_b > 0 and out_b % block_bytes == 0 and in_b % block_bytes == 0
        assert 0 < copies < (out_b + in_b) / block_bytes, "runs of blocks are copied as one"
        assert "tokenyard_host_prefix_hit_tokens_total" in m and m["tokenyard_num_requests_swapping"] == 0
    finally:
        assert server.stop() == 0, server.log.read_text()


# --------------------------------------------------------------------------- AsyncEngine in-process
def test_async_engine_close_and_shutdown_abort(tiny_llama_dir):
    import asyncio

    from tokenyard.engine.async_engine import AsyncEngine, EngineUnavailableError
    from tokenyard.engine.llm_engine import LLMEngine
    from tokenyard.sampling_params import InvalidParameterError, SamplingParams

    long = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)

    async def scenario() -> None:
        engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4)))
        engine.start()
        with pytest.raises(InvalidParameterError):  # validation errors surface before any output
            await engine.add_request([999], long)
        gen = engine.generate("w5 w6", long)
        first = await gen.__anext__()
        assert first.token_ids and not first.finished
        await gen.aclose()  # the consumer leaves: the request is aborted
        stream = await engine.add_request("w7", long)
        await stream.__anext__()
        await engine.shutdown(timeout=0)  # in-flight past the timeout: aborted
        outs = [o async for o in stream]
        assert outs[-1].finish_reason == "abort"
        s = engine.stats()
        assert s["kv_blocks_used"] == 0 and s["num_inflight"] == 0 and s["num_pending"] == 0
        with pytest.raises(EngineUnavailableError):
            await engine.add_request("w5", long)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_more_waiting_than_max_waiting_is_queue_full(tiny_llama_dir):
    """The 503 path: a call that could fit, but not now (the loop is not even started here, so nothing drains)."""
    import asyncio

    from tokenyard.engine.async_engine import AsyncEngine, QueueFullError
    from tokenyard.engine.llm_engine import LLMEngine
    from tokenyard.sampling_params import SamplingParams
    from tokenyard.server.errors import from_exception

    async def scenario() -> None:
        engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4)),
                             max_waiting=1)
        first = asyncio.ensure_future(engine.add_request("w5", SamplingParams(max_tokens=2)))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError) as e:
            await engine.add_request("w6", SamplingParams(max_tokens=2))
        assert from_exception(e.value).status == 503
        first.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_idle_invariant_violation_kills_the_loop_and_reports_it(tiny_llama_dir):
    """The loop checks the scheduler's integrity whenever it goes idle; a violation ends the loop, and
    ``on_failure`` (the server's exit) hears of it instead of the server answering 503 forever."""
    import asyncio

    from tokenyard.engine.async_engine import AsyncEngine, EngineUnavailableError
    from tokenyard.engine.llm_engine import LLMEngine
    from tokenyard.invariants import InvariantError
    from tokenyard.sampling_params import SamplingParams

    failures: list[BaseException] = []

    async def scenario() -> None:
        llm_engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4))
        engine = AsyncEngine(llm_engine, on_failure=failures.append)
        engine.start()
        outs = [o async for o in engine.generate("w5 w6", SamplingParams(max_tokens=3, temperature=0))]
        assert outs[-1].finish_reason == "length" and engine.is_running    # a clean idle check passed
        assert await engine.set_priority(["no-such-request"], 1) == 0
        llm_engine.kv.pool.blocks[0].ref_cnt = 1                           # a leaked block
        outs = [o async for o in engine.generate("w7", SamplingParams(max_tokens=2, temperature=0))]
        assert outs[-1].finished
        for _ in range(100):
            if failures:
                break
            await asyncio.sleep(0.05)
        assert failures and isinstance(failures[0], InvariantError)
        assert not engine.is_running
        with pytest.raises(EngineUnavailableError):
            await engine.add_request("w5", SamplingParams(max_tokens=2))

    asyncio.run(asyncio.wait_for(scenario(), 60))


# --------------------------------------------------------------------------- CLI
def test_engine_flags_map_onto_engine_config():
    args = build_parser().parse_args(["serve", "--max-num-batched-tokens", "64", "--no-enable-prefix-caching",
                                      "--num-kv-blocks", "9", "--kv-cache-memory-gb", "0.5"])
    cfg = engine_config(args)
    assert (cfg.max_num_batched_tokens, cfg.enable_prefix_caching, cfg.num_kv_blocks) == (64, False, 9)
    assert cfg.kv_cache_memory_gb == 0.5 and cfg.model is None and args.port == 8000


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_one_off_commands(tiny_llama_dir, capsys, command):
    from tokenyard.cli import main

    assert main([command, "w5 w6", "--model", str(tiny_llama_dir), "--max-tokens", "4", "--temperature", "0"]) == 0
    words = capsys.readouterr().out.split()
    assert 1 <= len(words) <= 4 and all(re.fullmatch(r"w\d+", w) for w in words)


# --------------------------------------------------------------------------- bundled model, API key, SIGTERM
KEY = "sekrit-key"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    server = Server(["--api-key", KEY, "--max-waiting", "4"], tmp_path_factory.mktemp("logs") / "bundled.log",
                    ready_timeout=240)
    yield server
    server.stop()


def test_api_key_required_everywhere_but_health(bundled):
    for path in ("/v1/models", CHAT, "/metrics", "/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{bundled.url}{path}").status_code == 401, path
    no_key = _post(bundled.url, CHAT, {"messages": MSG})
    wrong = _post(bundled.url, CHAT, {"messages": MSG}, {"Authorization": "Bearer nope"})
    for r in (no_key, wrong):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.get(f"{bundled.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert httpx.get(f"{bundled.url}/health").status_code == 200
    assert httpx.get(f"{bundled.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{bundled.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_bundled_model_chat(bundled):
    c = openai.OpenAI(base_url=f"{bundled.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    r = c.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=8, temperature=0,
                                  messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5


def test_sigterm_lets_inflight_stream_finish(bundled):
    body = {"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 24, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{bundled.url}{CHAT}", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        bundled.proc.send_signal(signal.SIGTERM)
        rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert bundled.proc.wait(timeout=30) == 0


def test_engine_error_reaches_the_client_as_500(tiny_llama_dir, sampling_fails_for_seed):
    """A request the engine aborts for an error gets a 500 naming it, streamed or not; others are served."""
    import asyncio

    import httpx

    from tokenyard.engine.async_engine import AsyncEngine
    from tokenyard.engine.llm_engine import LLMEngine
    from tokenyard.server.app import create_app

    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4)))
    app = create_app(engine)
    body = {"model": engine.model_name, "prompt": "w5 w6", "max_tokens": 4, "temperature": 1.0,
            "seed": sampling_fails_for_seed}

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 500
                assert "boom" in r.json()["error"]["message"]
                r = await c.post("/v1/completions", json=body | {"stream": True})
                assert '"error"' in r.text and "boom" in r.text and r.text.rstrip().endswith("data: [DONE]")
                r = await c.post("/v1/completions", json=body | {"seed": 1})
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
                for _ in range(100):  # stats are a snapshot taken after each step: give the loop a moment
                    if engine.stats()["kv_blocks_used"] == 0:
                        break
                    await asyncio.sleep(0.02)
                assert engine.stats()["kv_blocks_used"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))


# --------------------------------------------------------------------------- runtime priorities, tenants
@pytest.fixture(scope="module")
def one_seat(tiny_llama_dir, tmp_path_factory):
    """One running request at a time under the priority policy: whoever is queued waits its turn."""
    server = Server([str(tiny_llama_dir), "--served-model-name", "one-seat",   # vLLM's positional MODEL
                     "--max-num-seqs", "1", "--scheduling-policy", "priority",
                     "--check-invariants", "--metrics-max-tenants", "2"],
                    tmp_path_factory.mktemp("logs") / "one_seat.log")
    yield server
    assert server.stop() == 0, server.log.read_text()


def _stream_lines(url: str, body: dict, lines: list, started: concurrent.futures.Future) -> float:
    """Stream a chat completion, keep its SSE data lines, announce its X-Request-Id; return when it ended."""
    with httpx.stream("POST", f"{url}{CHAT}", json={**body, "stream": True}, timeout=60) as r:
        started.set_result(r.headers["x-request-id"])
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
    return time.monotonic()


def test_priority_raised_at_runtime_overtakes_a_running_request(one_seat):
    long_body = {"messages": MSG, "max_tokens": 200, "ignore_eos": True, "priority": 5, "user": "alice"}
    short_body = {"messages": MSG, "max_tokens": 4, "ignore_eos": True, "priority": 9, "user": "bob"}
    long_lines: list = []
    short_lines: list = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long_started: concurrent.futures.Future = concurrent.futures.Future()
        long_done = pool.submit(_stream_lines, one_seat.url, long_body, long_lines, long_started)
        long_started.result(timeout=30)
        deadline = time.monotonic() + 30
        while len(long_lines) < 3:       # the long request is running (it holds the only seat)
            assert time.monotonic() < deadline
            time.sleep(0.005)
        short_started: concurrent.futures.Future = concurrent.futures.Future()
        short_done = pool.submit(_stream_lines, one_seat.url, short_body, short_lines, short_started)
        short_id = short_started.result(timeout=30)
        assert short_id.startswith("chatcmpl-")
        r = httpx.post(f"{one_seat.url}/v1/requests/{short_id}/priority", json={"priority": 0})
        assert r.status_code == 200, r.text
        assert r.json() == {"id": short_id, "object": "request.priority", "priority": 0, "updated": 1}
        short_end, long_end = short_done.result(timeout=60), long_done.result(timeout=60)
    assert short_end < long_end, "the request made urgent did not overtake the running one"
    assert short_lines[-1] == "[DONE]" and long_lines[-1] == "[DONE]"
    long_tokens = sum(bool(json.loads(x)["choices"] and json.loads(x)["choices"][0]["delta"].get("content"))
                      for x in long_lines[:-1])
    assert long_tokens >= 100, "the preempted request must still complete"
    # Finished or unknown ids: 404 in OpenAI's error shape; a bad body: 400.
    for rid in (short_id, "chatcmpl-nope"):
        r = httpx.post(f"{one_seat.url}/v1/requests/{rid}/priority", json={"priority": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    for bad in ({"priority": "high"}, {"priority": 1.5}, {}, {"priority": 1, "extra": 2}, {"priority": -5}):
        r = httpx.post(f"{one_seat.url}/v1/requests/{short_id}/priority", json=bad)
        assert r.status_code == 400 and "error" in r.json(), (bad, r.text)
    r = httpx.post(f"{one_seat.url}{CHAT}", json={"messages": MSG, "max_tokens": 2, "priority": -5})
    assert r.status_code == 400 and "--client-priority-range" in r.json()["error"]["message"]  # 0:1000 default
    m = one_seat.metrics()
    assert m["tokenyard_preemptions_total"] >= 1
    assert m['tokenyard_tenant_service_total{tenant="alice"}'] >= 2.0 * 200
    assert m['tokenyard_tenant_service_total{tenant="bob"}'] >= 2.0 * 4


def test_tenant_labels_are_bounded(one_seat):
    for user in ("carol", "dave", "erin", "eve\ud800"):   # the last one holds a lone surrogate
        body = json.dumps({"messages": MSG, "max_tokens": 2, "user": user})   # ascii: "\\ud800" escaped
        r = httpx.post(f"{one_seat.url}{CHAT}", content=body, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 200, r.text
    m = one_seat.metrics()       # still parses, and still bounded
    for family in ("tokenyard_tenant_service_total{", "tokenyard_requests_total{"):
        tenants = {k.split('tenant="')[1].split('"')[0] for k in m if k.startswith(family)}
        assert len(tenants) <= 3 and "other" in tenants, (family, tenants)   # --metrics-max-tenants 2, + other
    assert m['tokenyard_tenant_service_total{tenant="other"}'] > 0


def test_tenant_label_values_are_printable_and_bounded():
    from prometheus_client import generate_latest

    from tokenyard.server.metrics import ServerMetrics

    stats = {"eve\ud800": (5.0, 5.0), "bob": (3.0, 3.0), "carol": (1.0, 1.0)}
    m = ServerMetrics(dict, lambda: stats, max_tenants=2)
    m.tracker("eve\ud800", 0.0).on_finish("stop")
    m.tracker("zed", 0.0).on_finish("stop")
    text = generate_latest(m.registry).decode()
    assert 'tenant="eve\\\\ud800"' in text and 'tokenyard_tenant_service_total{tenant="other"} 4.0' in text
    assert 'tokenyard_requests_total{finish_reason="stop",tenant="zed"}' in text   # second of 2 slots
    assert "carol" not in text and "bob" not in text


def test_engine_flags_have_help_and_choices():
    from tokenyard.config import EngineConfig

    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "EngineConfig." not in text and "(default: None)" not in text
    for choices in ("{fcfs,priority,vtc,vtc+priority}", "{recompute,swap}", "{auto,float32,bfloat16,float16}"):
        assert choices in text
    assert all(f.metadata.get("help") for f in dataclasses.fields(EngineConfig))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--preemption-mode", "teleport"])


def test_errors_are_classified_where_they_arise(caplog):
    from tokenyard.sampling_params import InvalidParameterError
    from tokenyard.server.errors import from_exception

    bad = from_exception(InvalidParameterError("top_p", "top_p must be in (0, 1]"))
    assert (bad.status, bad.param) == (400, "top_p")
    with caplog.at_level("ERROR"):
        internal = from_exception(ValueError("max_tokens: something inside broke"))   # not the client's fault
    assert internal.status == 500 and internal.param is None and internal.type == "server_error"
    error_id = internal.message.rsplit(" ", 1)[1]
    assert error_id.startswith("err-") and error_id in caplog.text


def test_tokenize_detokenize_version_and_served_name(one_seat, tiny_llama_dir):
    url = one_seat.url
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["one-seat"]
    r = httpx.post(f"{url}{CHAT}", json={"model": "one-seat", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "one-seat"
    assert httpx.post(f"{url}{CHAT}", json={"model": "tiny", "messages": MSG}).status_code == 404
    assert httpx.get(f"{url}/version").json()["version"]
    t = httpx.post(f"{url}/tokenize", json={"prompt": "w5 w6 w7", "add_special_tokens": False}).json()
    assert t["tokens"] == [5, 6, 7] and t["count"] == 3 and t["max_model_len"] == 256
    chat = httpx.post(f"{url}/tokenize", json={"model": "one-seat", "messages": MSG}).json()
    assert chat["count"] > 3
    assert httpx.post(f"{url}/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": "w5 w6 w7"}
    for path, body in (("/tokenize", {"prompt": "w5", "messages": MSG}), ("/tokenize", {}),
                       ("/detokenize", {"tokens": [10**6]}), ("/detokenize", {"tokens": ["5"]})):
        r = httpx.post(f"{url}{path}", json=body)
        assert r.status_code == 400 and "error" in r.json(), (path, body, r.text)
    args = build_parser().parse_args(["serve", str(tiny_llama_dir), "--served-model-name", "x"])
    assert args.model_path == str(tiny_llama_dir) and args.served_model_name == "x"


def test_shutdown_drains_then_aborts_with_proper_errors(tiny_llama_dir, tmp_path):
    """SIGTERM: /health and new requests get 503 JSON while in-flight requests drain; past --shutdown-timeout
    the rest are aborted through the engine, each stream ending in an error event and [DONE]; exit 0, soon."""
    server = Server([str(tiny_llama_dir), "--max-num-seqs", "1", "--shutdown-timeout", "0.6"],
                    tmp_path / "drain.log")
    body = {"messages": MSG, "max_tokens": 240, "ignore_eos": True, "stream": True, "n": 4}   # seconds of work
    results: list[list[str]] = []

    def stream(_: int) -> list[str]:
        with httpx.stream("POST", f"{server.url}{CHAT}", json=body, timeout=60) as r:
            return [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]

    def whole(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}{CHAT}", json={**body, "stream": False}, timeout=60)

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures, plain = [], []
            for i in range(12):                               # alternating, in order: both kinds are queued last
                (futures if i % 2 == 0 else plain).append(pool.submit(stream if i % 2 == 0 else whole, i))
                time.sleep(0.02)
            time.sleep(0.1)                                   # all in flight (seconds of work), one running
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            health = httpx.get(f"{server.url}/health", timeout=5)
            refused = httpx.post(f"{server.url}{CHAT}", json={"messages": MSG, "max_tokens": 2}, timeout=5)
            t0 = time.monotonic()
            results = [f.result(timeout=60) for f in futures]
            answers = [f.result(timeout=60) for f in plain]
        assert health.status_code == 503 and health.json() == {"status": "unavailable"}
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert server.proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 20
    finally:
        server.stop()
    aborted = [r for r in results if any('"error"' in x for x in r)]
    assert aborted, "the drain deadline must have cut some requests short"
    for r in results:
        assert r[-1] == "[DONE]"
    for r in aborted:
        assert json.loads(r[-2])["error"]["code"] == "engine_unavailable"
    cut = [a for a in answers if a.status_code != 200]
    assert cut, "a non-streaming request must have been cut short too"
    for a in cut:
        assert a.status_code == 503 and a.json()["error"]["code"] in ("engine_unavailable", None)
    log = (tmp_path / "drain.log").read_text()
    assert "Traceback" not in log, log[-2000:]


def test_openapi_document_is_true_to_the_responses(tiny):
    doc = httpx.get(f"{tiny.url}/openapi.json").json()
    text = json.dumps(doc)
    assert '"422"' not in text and "HTTPValidationError" not in text
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/OpenAIError"
    assert "/v1/requests/{request_id}/priority" in doc["paths"] and "/tokenize" in doc["paths"]
    r = httpx.request("TRACE", f"{tiny.url}/version")
    assert r.status_code == 405 and "GET" in r.headers["allow"] and r.json()["error"]["code"] == "method_not_allowed"


def test_engine_loop_crash_makes_the_server_exit_non_zero(tiny_llama_dir, tmp_path):
    """A supervisor must see the failure: the process exits 1 with a clear line, not a zombie answering 503."""
    import subprocess
    import sys

    from tests.servers import free_port

    port = free_port()
    code = ("import sys\n"
            "import tokenyard.engine.llm_engine as m\n"
            "def broken_step(self):\n    raise RuntimeError('injected engine failure')\n"
            "m.LLMEngine.step = broken_step\n"
            "from tokenyard.cli import main\n"
            f"sys.exit(main(['serve', {str(tiny_llama_dir)!r}, '--port', '{port}', '--log-level', 'warning']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.1)
        r = httpx.post(f"{url}{CHAT}", json={"messages": MSG, "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "the engine loop failed" in proc.stdout.read()


def test_a_second_signal_stops_at_once(tiny_llama_dir, tmp_path):
    server = Server([str(tiny_llama_dir), "--max-num-seqs", "1", "--shutdown-timeout", "60"], tmp_path / "twice.log")
    body = {"messages": MSG, "max_tokens": 240, "ignore_eos": True, "n": 8}
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(httpx.post, f"{server.url}{CHAT}", json=body, timeout=120) for _ in range(4)]
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)           # drain: would wait up to 60 s
            time.sleep(0.5)
            assert server.proc.poll() is None
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)           # stop now
            assert server.proc.wait(timeout=30) == 0
            assert time.monotonic() - t0 < 15
            for c in calls:
                with contextlib.suppress(httpx.HTTPError):
                    c.result(timeout=30)
    finally:
        server.stop()

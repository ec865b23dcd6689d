"""A minimal Hugging Face transformers serving baseline with STATIC batching.

It serves the very weights tokenyard serves (the fp32 Hugging Face directory tokenyard converts the bundled
GGUF into, or any model tokenyard's loader resolves) through an OpenAI-compatible subset:

    GET  /health, GET /v1/models
    POST /v1/completions   (prompt: a string or a list of token ids; max_tokens, temperature, top_p, seed,
                            ignore_eos, stream, stream_options.include_usage; n = 1 only)

Static batching, as `model.generate` on a list of prompts does it: one worker thread takes the first waiting
request, waits up to --batch-wait-ms for more (at most --max-batch in all), left-pads the prompts, runs one
prefill for the whole batch and then one decode step per token for the whole batch, with the KV cache in
`past_key_values`, until EVERY request in the batch is finished. Requests that arrive meanwhile wait for the
next batch; a finished request's response ends at once, but its row keeps its place (its tokens are computed
and dropped) until the batch ends. Each token is streamed as it is sampled, so TTFT and inter-token latency
are real.

Run: python benchmarks/peers/hf_server.py --port 8002 [--model PATH] [--max-batch 16] [--batch-wait-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenyard.model.loader import ensure_hf_weights, resolve_model

_DONE = object()


@dataclass
class _Req:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    ignore_eos: bool
    seed: int | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    # filled in by the worker
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prefix_offset: int = 0
    read_offset: int = 0

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class _BadRequest(Exception):
    pass


class StaticBatcher:
    """Owns the model; runs one batch at a time on a worker thread."""

    def __init__(self, model, tokenizer, max_batch: int, batch_wait_s: float, max_len: int):
        self.model = model
        self.tok = tokenizer
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_len = max_len
        eos = getattr(model.generation_config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.waiting: queue.Queue[_Req] = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._run, name="hf-static-batcher", daemon=True)
        self.thread.start()

    def submit(self, req: _Req) -> None:
        self.waiting.put(req)

    # ------------------------------------------------------------------ worker
    def _collect(self) -> list[_Req]:
        batch = [self.waiting.get()]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.waiting.get(timeout=left) if left > 0 else self.waiting.get_nowait())
            except queue.Empty:
                break
        return [r for r in batch if not r.cancelled]

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if not batch:
                continue
            try:
                with torch.inference_mode():
                    self._generate(batch)
            except Exception as e:  # noqa: BLE001 - report to every request of the batch, keep serving
                for r in batch:
                    if r.finish_reason is None:  # the finished ones already have their _DONE
                        r.put(e)
            self.batches += 1

    def _sample(self, logits: torch.Tensor, batch: list[_Req], gens: list[torch.Generator | None]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, r in enumerate(batch):
            if r.temperature < 1e-5:
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i].float() / r.temperature, dim=-1)
            if r.top_p < 1.0:
                sp, si = probs.sort(descending=True)
                keep = sp.cumsum(0) - sp < r.top_p
                probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
            out.append(int(torch.multinomial(probs, 1, generator=gens[i]).item()))
        return out

    def _delta(self, r: _Req) -> str:
        """Incremental detokenization: text added by the newest token, held back while it ends mid-character."""
        prefix = self.tok.decode(r.ids[r.prefix_offset:r.read_offset], skip_special_tokens=True)
        full = self.tok.decode(r.ids[r.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            r.prefix_offset, r.read_offset = r.read_offset, len(r.ids)
            return full[len(prefix):]
        return ""

    def _generate(self, batch: list[_Req]) -> None:
        device = self.model.device
        b = len(batch)
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every prompt ends at the last column
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = []
        for r in batch:
            g = None
            if r.seed is not None and r.temperature >= 1e-5:
                g = torch.Generator(device="cpu").manual_seed(r.seed)
            gens.append(g)
        input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        active = [True] * b
        steps = max(r.max_tokens for r in batch)
        for step in range(steps):
            tokens = self._sample(out.logits[:, -1, :].cpu(), batch, gens)
            for i, r in enumerate(batch):
                if not active[i]:
                    continue
                r.ids.append(tokens[i])
                if not r.ignore_eos and tokens[i] in self.eos_ids:
                    r.finish_reason = "stop"
                elif len(r.ids) >= r.max_tokens:
                    r.finish_reason = "length"
                if r.finish_reason is not None:
                    active[i] = False
                if not r.cancelled:
                    r.put((self._delta(r), r.finish_reason))
                if r.finish_reason is not None:
                    r.put(_DONE)  # its answer is complete; its row still runs until the batch ends
            if not any(active) or step == steps - 1:
                break
            mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
            positions = positions[:, -1:] + 1
            nxt = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
            out = self.model(input_ids=nxt, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------- HTTP
def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def build_app(batcher: StaticBatcher, model_name: str) -> FastAPI:
    app = FastAPI(title="hf static-batching baseline")
    created = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "hf-static-baseline"}]}

    def parse(body: dict, loop) -> _Req:  # runs in a worker thread: tokenizing can take a while
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = batcher.tok.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise _BadRequest("prompt must be one non-empty string or one list of token ids")
        if not ids:
            raise _BadRequest("prompt is empty")
        if (body.get("n") or 1) != 1:
            raise _BadRequest("only n = 1 is supported")
        max_tokens = body.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise _BadRequest("max_tokens must be a positive integer")
        if len(ids) + max_tokens > batcher.max_len:
            raise _BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"model's context of {batcher.max_len} tokens")
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        seed = body.get("seed")
        return _Req(prompt_ids=ids, max_tokens=max_tokens,
                    temperature=1.0 if temperature is None else float(temperature),
                    top_p=1.0 if top_p is None else float(top_p),
                    ignore_eos=bool(body.get("ignore_eos", False)),
                    seed=None if seed is None else int(seed), loop=loop)

    @app.post("/v1/completions")
    async def completions(raw: Request):
        try:
            body = await raw.json()
            if not isinstance(body, dict):
                raise _BadRequest("the body must be a JSON object")
            req = await asyncio.to_thread(parse, body, asyncio.get_running_loop())
        except _BadRequest as e:
            return _error(400, str(e))
        except (ValueError, TypeError) as e:
            return _error(400, f"bad request: {e}")
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        batcher.submit(req)

        def usage() -> dict:
            n = len(req.ids)
            return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                    "total_tokens": len(req.prompt_ids) + n}

        def chunk(choices: list, **extra) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices, **extra}

        if not stream:
            parts = []
            try:
                while (item := await req.out.get()) is not _DONE:
                    if isinstance(item, Exception):
                        return _error(500, f"generation failed: {item}", "server_error")
                    parts.append(item[0])
            except asyncio.CancelledError:
                req.cancelled = True
                raise
            return chunk([{"index": 0, "text": "".join(parts), "logprobs": None,
                           "finish_reason": req.finish_reason}], usage=usage())

        async def events():
            try:
                while (item := await req.out.get()) is not _DONE:
                    if isinstance(item, Exception):
                        yield _sse({"error": {"message": f"generation failed: {item}", "type": "server_error"}})
                        break
                    text, finish = item  # one chunk per generated token (text may be empty mid-character)
                    yield _sse(chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]))
                else:
                    if include_usage:
                        yield _sse(chunk([], usage=usage()))
                yield _sse("[DONE]")
            finally:
                req.cancelled = True  # a disconnected client's row stops sending (its batch still runs)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF directory or GGUF file (default: the bundled SmolLM2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=16, help="requests in one static batch at most")
    p.add_argument("--batch-wait-ms", type=float, default=100.0,
                   help="after the first request of a batch, wait at most this long for the batch to fill")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.batch_wait_ms < 0:
        p.error("--max-batch must be >= 1 and --batch-wait-ms >= 0")

    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    ensure_hf_weights(resolved.hf_dir)   # a converted GGUF keeps only its quantized blocks until asked
    tok = AutoTokenizer.from_pretrained(str(resolved.hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(resolved.hf_dir), dtype=torch.float32).to(args.device)
    model.eval()
    max_len = int(getattr(model.config, "max_position_embeddings", 2048))
    batcher = StaticBatcher(model, tok, args.max_batch, args.batch_wait_ms / 1000.0, max_len)
    app = build_app(batcher, resolved.name)
    print(f"hf_server: serving {resolved.name} ({resolved.hf_dir}) on http://{args.host}:{args.port} "
          f"(static batches of <= {args.max_batch}, wait {args.batch_wait_ms:g} ms, {args.threads} threads)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""llama-cpp-python's server (`python -m llama_cpp.server`), plus `ignore_eos` on completion requests.

llama-cpp-python's CreateCompletionRequest has no `ignore_eos` field (pydantic drops unknown fields), so a
benchmark asking for fixed output lengths would get shorter answers from it than from the other servers.
This runs the stock server, with the same command-line flags, behind one ASGI wrapper: a POST to
/v1/completions or /v1/chat/completions whose JSON has "ignore_eos": true gets a logit bias of -1e9 on every
end-of-generation token of the model's vocabulary (llama_vocab_is_eog; these are the tokens on which
llama-cpp-python stops), merged into its own "logit_bias". That is what llama-server's ignore_eos does.
Nothing else is touched. Runs in llama-cpp-python's venv; imports nothing from tokenyard.
"""

from __future__ import annotations

import json
import sys

import llama_cpp
import llama_cpp.server.__main__ as server_main

_PATHS = ("/v1/completions", "/v1/chat/completions")


def eog_token_ids(model_path: str) -> list[int]:
    vocab_model = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    vocab = vocab_model._model.vocab
    ids = [i for i in range(vocab_model.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    vocab_model.close()
    return ids


class IgnoreEos:
    def __init__(self, app, eog_ids: list[int]):
        self.app = app
        self.bias = {str(i): -1e9 for i in eog_ids}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left before the body arrived
                return await self.app(scope, receive, send)
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("ignore_eos") and data.get("logit_bias_type") != "tokens":
            data["logit_bias"] = {**(data.get("logit_bias") or {}), **self.bias}
            body = json.dumps(data).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads: disconnect detection while streaming

        return await self.app(scope, replay, send)


def main() -> None:
    model = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else None
    if model is None:
        raise SystemExit("llama_cpp_python_server: --model FILE is required")
    ids = eog_token_ids(model)
    print(f"llama_cpp_python_server: ignore_eos masks end-of-generation tokens {ids}", file=sys.stderr, flush=True)
    create_app = server_main.create_app
    server_main.create_app = lambda *a, **kw: IgnoreEos(create_app(*a, **kw), ids)
    server_main.main()


if __name__ == "__main__":
    main()

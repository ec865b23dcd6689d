"""Engine outputs -> OpenAI JSON shapes (chat and legacy completions), for whole responses and SSE chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

from tokenyard.model.tokenizer import Tokenizer
from tokenyard.outputs import TokenLogprob


class TokenStrings:
    """Token id -> its text, cached (the vocabulary is fixed, and logprobs ask for the same ids often)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._get = lru_cache(maxsize=65536)(lambda i: tokenizer.decode([i], skip_special_tokens=False))

    def __call__(self, token_id: int) -> str:
        return self._get(token_id)


def chat_logprobs(lps: list[TokenLogprob], text_of: TokenStrings) -> dict:
    def entry(tid: int, lp: float) -> dict:
        s = text_of(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
    ]}


@dataclass
class CompletionLogprobs:
    """The legacy completions logprobs object, built up across streamed deltas (text_offset runs on)."""

    offset: int = 0
    tokens: list[str] = field(default_factory=list)

    def chunk(self, lps: list[TokenLogprob], text_of: TokenStrings) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            s = text_of(lp.token_id)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({text_of(t): v for t, v in lp.top})
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"

"""What the engine hands back for a request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # (token id, logprob) of the most likely tokens, best first


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None   # "stop" | "length" | "abort"; None while running
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0         # prompt tokens served from the prefix cache
    new_text: str = ""                 # text added by the latest step (for streaming)
    new_token_ids: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None           # why the engine aborted this request (finish_reason "abort"), if it did

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

"""RequestRecord: what was asked for, and what happened to one request (every time relative to a run's start)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    index: int
    input_len: int                      # prompt tokens asked for (a later turn: the new user text only)
    output_len: int                     # max_tokens sent
    tenant: str | None = None
    priority: int | None = None
    conversation: int | None = None
    turn: int = 0
    scheduled_s: float | None = None    # planned send time; None for a later turn (sent when the previous ends)
    sent: bool = False
    send_s: float | None = None         # when the request was actually sent (after the concurrency limit)
    ttft_s: float | None = None         # send -> first streamed text
    latency_s: float | None = None      # send -> end of the response, or -> the failure
    token_s: list[float] = field(default_factory=list)  # send -> each chunk that carried text
    prompt_tokens: int | None = None    # as the server counted them (usage), when it said
    output_tokens: int = 0              # usage.completion_tokens, else the number of text chunks
    finish_reason: str | None = None
    error_kind: str | None = None       # connect, timeout, http_<status>, stream_error, malformed_stream, ...
    error: str | None = None
    text: str = ""                      # the generated text (kept for the next turn; not written to JSON)

    @property
    def ok(self) -> bool:
        return self.sent and self.error_kind is None and self.latency_s is not None

    @property
    def e2e_s(self) -> float | None:
        return self.latency_s if self.ok else None

    @property
    def end_s(self) -> float | None:
        if self.send_s is None or self.latency_s is None:
            return None
        return self.send_s + self.latency_s

    def fail(self, kind: str, message: str, latency_s: float | None = None) -> None:
        self.error_kind, self.error = kind, message
        if latency_s is not None:
            self.latency_s = latency_s

    def to_json(self) -> dict:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        itl = [b - a for a, b in zip(self.token_s, self.token_s[1:])]
        return {
            "index": self.index, "tenant": self.tenant, "priority": self.priority,
            "conversation": self.conversation, "turn": self.turn,
            "input_len": self.input_len, "output_len": self.output_len,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "ok": self.ok, "scheduled_s": r(self.scheduled_s), "send_s": r(self.send_s),
            "ttft_s": r(self.ttft_s), "latency_s": r(self.latency_s),
            "itl_s": [round(x, 6) for x in itl],
            "finish_reason": self.finish_reason, "error_kind": self.error_kind, "error": self.error,
        }

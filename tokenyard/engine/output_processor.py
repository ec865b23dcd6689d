"""Token ids -> what the caller sees: detokenization, stop strings and the growing ``RequestOutput``.

An instance's engine emits :class:`TokenEvent` s (token ids, logprobs, how the scheduler finished a request);
this turns them into outputs. It runs inside ``LLMEngine.step`` for one instance, and in the cluster
frontend for many: there the state that must survive moving a request between instances (the text so far,
the detokenizer's window, stop strings) never leaves the frontend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tokenyard.model.tokenizer import IncrementalDetokenizer, Tokenizer
from tokenyard.outputs import RequestOutput, TokenLogprob
from tokenyard.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """One request's news from one step of an instance: a sampled token, and whether the scheduler finished it.

    ``hide``: the token is the stop token that ended the request (it is counted but adds no text)."""

    request_id: str
    token_id: int
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None     # "stop" (EOS / stop id) | "length"; None while running
    hide: bool = False
    num_cached_tokens: int = 0
    error: str | None = None             # the engine aborted the request (``token_id`` is -1, no token)
    position: int = 0                    # output tokens the request had before this one (orders a stream
                                         # whose events come from two instances around a migration)


@dataclass
class _Tracked:
    params: SamplingParams
    detok: IncrementalDetokenizer
    out: RequestOutput
    max_stop_len: int


class OutputProcessor:
    """Per-request output state, fed one :class:`TokenEvent` at a time. Not thread-safe: one owner thread."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._tracked: dict[str, _Tracked] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tracked

    def __len__(self) -> int:
        return len(self._tracked)

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            arrival_time: float) -> None:
        out = RequestOutput(request_id=request_id, prompt_token_ids=prompt_token_ids,
                            logprobs=[] if params.logprobs is not None else None)
        out.metrics["arrival_time"] = arrival_time
        self._tracked[request_id] = _Tracked(params, IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                                             out, max((len(s) for s in params.stop), default=0))

    def output(self, request_id: str) -> RequestOutput:
        """The request's output so far (the same object the events update)."""
        return self._tracked[request_id].out

    def process(self, ev: TokenEvent, now: float) -> tuple[RequestOutput | None, bool]:
        """Apply one event. Returns the updated output and whether a stop string ended the request here (the
        caller then finishes it in the scheduler that runs it); None for an error event of an untracked request.
        Raises if detokenization fails, leaving the output as it was."""
        if ev.error is not None:
            return self.abort(ev.request_id, ev.error, now), False
        t = self._tracked[ev.request_id]
        o = t.out
        tok = ev.token_id
        finish = ev.finish_reason
        delta = "" if ev.hide else t.detok.add([tok])
        stopped_by_string = False
        if t.params.stop and delta and len(o.token_ids) + 1 >= t.params.min_tokens:   # vLLM: none before
            cut = self._find_stop(t, delta)
            if cut is not None:
                delta = delta[: max(cut - (len(t.detok.text) - len(delta)), 0)]
                t.detok.text = t.detok.text[:cut]
                if finish is None:
                    finish, stopped_by_string = "stop", True
        if "first_token_time" not in o.metrics:
            o.metrics["first_token_time"] = now
            o.num_cached_tokens = max(ev.num_cached_tokens, 0)
        o.token_ids.append(tok)
        o.new_token_ids = [tok]
        if o.logprobs is not None and ev.logprob is not None:
            o.logprobs.append(ev.logprob)
        o.text = t.detok.text
        o.new_text = delta
        if finish is not None:
            o.finish_reason = finish
            o.metrics["finished_time"] = now
            del self._tracked[ev.request_id]
        return o, stopped_by_string

    def apply(self, ev: TokenEvent, now: float) -> tuple[RequestOutput | None, bool]:
        """:meth:`process`, with a detokenization failure failing this request alone (finished with "abort" and
        ``error``). The flag: the request ended here (a stop string, or that failure), so whoever runs it must
        stop it; the output's ``finish_reason`` says which."""
        try:
            return self.process(ev, now)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            log.exception("request %s failed after sampling; aborting it", ev.request_id)
            return self.abort(ev.request_id, f"detokenizing the output failed: {e!r}", now), True

    def abort(self, request_id: str, error: str | None = None, now: float | None = None) -> RequestOutput | None:
        """Finish a request with "abort" (``error``: why the engine had to); None if it is not tracked."""
        t = self._tracked.pop(request_id, None)
        if t is None:
            return None
        o = t.out
        o.finish_reason = "abort"
        o.error = error
        o.new_text, o.new_token_ids = "", []
        if now is not None:
            o.metrics["finished_time"] = now
        return o

    @staticmethod
    def _find_stop(t: _Tracked, delta: str) -> int | None:
        text = t.detok.text
        start = max(len(text) - len(delta) - t.max_stop_len + 1, 0)
        hits = [i for i in (text.find(s, start) for s in t.params.stop) if i >= 0]
        return min(hits) if hits else None

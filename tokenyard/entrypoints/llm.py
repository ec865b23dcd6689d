"""The offline API: ``LLM(...).generate(prompts, SamplingParams(...))``, in the form vLLM users know."""

from __future__ import annotations

from collections.abc import Sequence

from tokenyard.config import EngineConfig
from tokenyard.engine.llm_engine import LLMEngine
from tokenyard.outputs import RequestOutput
from tokenyard.sampling_params import InvalidParameterError, SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_args) -> None:
        unknown = set(engine_args) - EngineConfig.field_names()
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: int | Sequence[int] | None = None,
        tenant: str | Sequence[str] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``.

        ``priority`` (lower is more urgent) and ``tenant`` (whose fair share the request counts against)
        are one value for all prompts or one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as token ids
        prompts = list(prompts)
        params = self._expand(sampling_params, len(prompts), "sampling_params")
        prios = self._expand(priority, len(prompts), "priority", default=0)
        tenants = self._expand(tenant, len(prompts), "tenant", default="default")
        # Validate everything before queueing anything, so a bad prompt leaves the engine untouched.
        for p in prompts:
            self.engine.tokenize_prompt(p)
        ids: list[str] = []
        try:
            for p, sp, pr, t in zip(prompts, params, prios, tenants):
                ids.append(self.engine.add_request(p, sp, priority=pr, tenant=t))
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: int | Sequence[int] | None = None,
        tenant: str | Sequence[str] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant's reply."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(_check_messages(c)) for c in convs]
        return self.generate(prompts, sampling_params, priority=priority, tenant=tenant)

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a queued or running request's priority from the next step (for step-by-step use through
        ``self.engine``: ``generate`` runs its requests to completion before returning)."""
        return self.engine.set_priority(request_id, priority)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        want = set(ids)
        try:
            while want - done.keys():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            self.engine.abort_request(list(want - done.keys()))
            raise
        return [done[i] for i in ids]

    @staticmethod
    def _expand(value, n: int, name: str, default=None) -> list:
        if value is None:
            return [default if default is not None else SamplingParams() for _ in range(n)]
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise InvalidParameterError(name, f"{name} has {len(value)} entries for {n} prompts")
            return list(value)
        return [value] * n


def _check_messages(conv: list[dict]) -> list[dict]:
    if not isinstance(conv, list) or not conv:
        raise InvalidParameterError("messages", "messages must be a non-empty list")
    for m in conv:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidParameterError("messages", "each message needs a string 'role' and 'content'")
    return conv

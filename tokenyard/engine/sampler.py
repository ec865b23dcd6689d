"""Next-token choice: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs; and per-request logit
processing first: logit_bias, repetition/presence/frequency penalties, stop tokens masked until min_tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tokenyard.outputs import TokenLogprob
from tokenyard.sampling_params import SamplingParams

# The token ``sample`` reports for a request whose sampling failed; the reason is in its ``SampleState.error``.
SAMPLE_FAILED = -1
LOGPROB_FLOOR = -9999.0


@dataclass
class SampleState:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy requests
    error: str | None = None           # why sampling this request failed (its token is then SAMPLE_FAILED)
    stop_token_ids: tuple[int, ...] = ()  # masked out until min_tokens tokens were sampled
    num_sampled: int = 0
    output_counts: torch.Tensor | None = None  # [V] how often each token was generated (presence/frequency)
    seen: torch.Tensor | None = None           # [V] bool: in the prompt or generated (repetition penalty)
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    # Vocabulary-sized tensors are made at the first sample, not while the request waits in the queue.
    vocab_size: int = 0
    prompt_token_ids: list[int] | None = None
    device: torch.device | None = None
    penalized: bool = False   # params.penalized, read once: it is asked for every request every step

    @property
    def masks_stops(self) -> bool:
        return self.num_sampled < self.params.min_tokens and bool(self.stop_token_ids)

    @property
    def processes_logits(self) -> bool:
        return self.penalized or self.masks_stops

    def record(self, token: int) -> None:
        self.num_sampled += 1
        if self.penalized:
            self._materialize()
        if self.output_counts is not None:
            self.output_counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def _materialize(self) -> None:
        p, dev = self.params, self.device
        if (p.presence_penalty or p.frequency_penalty) and self.output_counts is None:
            self.output_counts = torch.zeros(self.vocab_size, device=dev)
        if p.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=dev)
            if self.prompt_token_ids:
                self.seen[torch.tensor(self.prompt_token_ids, device=dev)] = True
            self.prompt_token_ids = None
        if p.logit_bias and self.bias_ids is None:
            self.bias_ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=dev)
            self.bias_values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=dev)

    def process(self, row: torch.Tensor) -> None:
        """Apply this request's logit processing to its row of logits, in place."""
        p = self.params
        if self.penalized:
            self._materialize()
        if self.bias_ids is not None:
            row.index_add_(0, self.bias_ids, self.bias_values.to(row.dtype))
        if self.seen is not None:
            r = p.repetition_penalty
            picked = row[self.seen]
            row[self.seen] = torch.where(picked > 0, picked / r, picked * r)
        if self.output_counts is not None:
            row -= p.frequency_penalty * self.output_counts + p.presence_penalty * (self.output_counts > 0)
        if self.masks_stops:
            row[list(self.stop_token_ids)] = float("-inf")


def make_sample_state(params: SamplingParams, device: torch.device, stop_token_ids: tuple[int, ...] = (),
                      prompt_token_ids: list[int] | None = None, vocab_size: int | None = None) -> SampleState:
    """``stop_token_ids``: the tokens that would end the request (EOS unless ignore_eos, and the stop ids);
    they cannot be sampled before ``params.min_tokens`` tokens, as in vLLM. The penalties need the prompt
    and the vocabulary size."""
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        # A request's own generator makes its draws independent of whatever else is in the batch.
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    state = SampleState(params, generator, stop_token_ids=stop_token_ids, penalized=params.penalized)
    if state.penalized:
        if vocab_size is None:
            raise ValueError("penalties need the vocabulary size")
        state.vocab_size, state.device = vocab_size, device
        if params.repetition_penalty != 1.0:
            state.prompt_token_ids = list(prompt_token_ids or [])
    return state


def sample(logits: torch.Tensor, states: list[SampleState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [S, V] for S requests, in the order of ``states``.

    A failure in one request's row (e.g. non-finite probabilities) does not fail the batch: that request gets
    the token ``SAMPLE_FAILED``, no logprobs, and the reason in its state's ``error``.
    """
    processed = [i for i, s in enumerate(states) if s.processes_logits]
    if processed:
        logits = logits.clone()
        for i in processed:
            states[i].process(logits[i])
    greedy_rows = [i for i, s in enumerate(states) if s.generator is None]
    tokens: list[int] = [0] * len(states)
    if len(greedy_rows) == len(states):
        tokens = logits.argmax(dim=-1).tolist()
    else:
        if greedy_rows:
            idx = torch.tensor(greedy_rows)
            for i, t in zip(greedy_rows, logits[idx].argmax(dim=-1).tolist()):
                tokens[i] = t
        for i, s in enumerate(states):
            if s.generator is not None:
                try:
                    tokens[i] = _sample_row(logits[i], s)
                except Exception as e:  # noqa: BLE001 - this request fails, the rest of the batch goes on
                    s.error = f"sampling failed: {e}"
                    tokens[i] = SAMPLE_FAILED
    for s, t in zip(states, tokens):
        if t != SAMPLE_FAILED:
            s.record(t)
    logprobs: list[TokenLogprob | None] = [None] * len(states)
    want = [i for i, s in enumerate(states) if s.params.logprobs is not None and tokens[i] != SAMPLE_FAILED]
    if want:
        lp = torch.log_softmax(logits[torch.tensor(want)].float(), dim=-1)
        # Masked or overflowing logits give -inf (or NaN): JSON has neither; report OpenAI's floor instead.
        lp = torch.nan_to_num(lp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR, posinf=0.0).clamp_(min=LOGPROB_FLOOR)
        for row, i in enumerate(want):
            k = states[i].params.logprobs
            top = []
            if k:
                vals, ids = lp[row].topk(k)
                top = list(zip(ids.tolist(), vals.tolist()))
            logprobs[i] = TokenLogprob(tokens[i], float(lp[row, tokens[i]]), top)
    return tokens, logprobs


def _sample_row(row: torch.Tensor, s: SampleState) -> int:
    p = s.params
    row = row.float() / p.temperature
    if p.min_p > 0:   # before top-k/top-p, as vLLM does: relative to the likeliest token of the whole row
        probs = row.softmax(-1)
        row = row.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        kth = row.topk(p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[0] = False   # a top_p below float32's resolution would otherwise drop even the best token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
    probs = row.softmax(-1)
    # NaN/inf logits (or nothing left to pick) make softmax non-finite. Check before multinomial: on CPU it
    # would raise anyway, but on CUDA it trips a device-side assert that takes the whole process down.
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the model's logits for this request are not finite (NaN or inf)")
    return int(torch.multinomial(probs, 1, generator=s.generator).item())

"""Next-token choice: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tokenyard.outputs import TokenLogprob
from tokenyard.sampling_params import SamplingParams

# The token ``sample`` reports for a request whose sampling failed; the reason is in its ``SampleState.error``.
SAMPLE_FAILED = -1


@dataclass
class SampleState:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy requests
    error: str | None = None           # why sampling this request failed (its token is then SAMPLE_FAILED)
    stop_token_ids: tuple[int, ...] = ()  # masked out until min_tokens tokens were sampled
    num_sampled: int = 0

    @property
    def masks_stops(self) -> bool:
        return self.num_sampled < self.params.min_tokens and bool(self.stop_token_ids)


def make_sample_state(params: SamplingParams, device: torch.device,
                      stop_token_ids: tuple[int, ...] = ()) -> SampleState:
    """``stop_token_ids``: the tokens that would end the request (EOS unless ignore_eos, and the stop ids);
    they cannot be sampled before ``params.min_tokens`` tokens, as in vLLM."""
    if params.greedy:
        return SampleState(params, None, stop_token_ids=stop_token_ids)
    g = torch.Generator(device=device)
    # A request's own generator makes its draws independent of whatever else is in the batch.
    g.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return SampleState(params, g, stop_token_ids=stop_token_ids)


def sample(logits: torch.Tensor, states: list[SampleState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [S, V] for S requests, in the order of ``states``.

    A failure in one request's row (e.g. non-finite probabilities) does not fail the batch: that request gets
    the token ``SAMPLE_FAILED``, no logprobs, and the reason in its state's ``error``.
    """
    masked = [i for i, s in enumerate(states) if s.masks_stops]
    if masked:
        logits = logits.clone()
        for i in masked:
            logits[i, list(states[i].stop_token_ids)] = float("-inf")
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
            s.num_sampled += 1
    logprobs: list[TokenLogprob | None] = [None] * len(states)
    want = [i for i, s in enumerate(states) if s.params.logprobs is not None and tokens[i] != SAMPLE_FAILED]
    if want:
        lp = torch.log_softmax(logits[torch.tensor(want)].float(), dim=-1)
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
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        kth = row.topk(p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
    probs = row.softmax(-1)
    # NaN/inf logits (or nothing left to pick) make softmax non-finite. Check before multinomial: on CPU it
    # would raise anyway, but on CUDA it trips a device-side assert that takes the whole process down.
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the model's logits for this request are not finite (NaN or inf)")
    return int(torch.multinomial(probs, 1, generator=s.generator).item())

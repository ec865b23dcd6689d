"""Per-request sampling settings, validated when made so bad values never reach the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

# Below this temperature a request is greedy: dividing logits by a tinier value overflows to inf (then NaN).
GREEDY_TEMPERATURE = 1e-5
# What torch.Generator.manual_seed takes: any signed or unsigned 64-bit integer (the API's int64 seeds, and
# seed + i for its n choices, both fit).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1 or 0: no top-k
    seed: int | None = None         # same seed => same output, whatever else is in the batch
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None     # None: none; k >= 0: chosen token's logprob plus the top k
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0   # OpenAI's: minus this on every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often a token was generated
    repetition_penalty: float = 1.0  # vLLM's (CTRL's): tokens in the prompt or output: logit / r if > 0, * r if < 0
    min_p: float = 0.0              # drop tokens less likely than min_p times the likeliest one
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit, in [-100, 100]

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
               "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0,
               "temperature", f"must be >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
               "top_k", f"must be -1 (off) or >= 0, got {self.top_k!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                     and SEED_MIN <= self.seed <= SEED_MAX),
               "seed", f"must be an integer in [-2**63, 2**64), got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(len(self.stop) <= 16 and all(len(s) <= 256 for s in self.stop), "stop",
               "may hold at most 16 strings of at most 256 characters (each is searched for after every token)")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must be non-negative integers")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", f"must be in [0, max_tokens], got {self.min_tokens!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               "logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_number(v) and -2 <= v <= 2, name, f"must be in [-2, 2], got {v!r}")
        _check(_is_number(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100,
               "repetition_penalty", f"must be in [0.01, 100], got {self.repetition_penalty!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        self.logit_bias = dict(self.logit_bias or {})
        _check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and _is_number(b) and -100 <= b <= 100
                   for t, b in self.logit_bias.items()),
               "logit_bias", "must map token ids (integers >= 0) to numbers in [-100, 100]")
        _check(len(self.logit_bias) <= 1024, "logit_bias", "may name at most 1024 tokens")

    @property
    def penalized(self) -> bool:
        """Do the logits need per-request processing beyond temperature/top-k/top-p/min-p?"""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # excludes NaN


def _check(ok: bool, param: str, msg: str) -> None:
    if not ok:
        raise InvalidParameterError(param, f"{param} {msg}")


class InvalidParameterError(ValueError):
    """A request parameter is out of range; ``param`` names it (the server reports it as OpenAI's param)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

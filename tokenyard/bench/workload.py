"""What a benchmark sends: one RequestSpec per request (lengths, tenant, priority, conversation and turn, arrival).

A run is a list of chains. A chain is a conversation: its first turn is sent at its arrival time, each later
turn right after the previous one completes (its prompt is the conversation so far plus new user text). A
single request is a chain of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenyard.bench.arrivals import arrival_times

DISTRIBUTIONS = ("uniform", "zipf")


@dataclass
class RequestSpec:
    index: int
    input_len: int                 # prompt tokens (a later turn: tokens of its new user text)
    output_len: int                # max_tokens
    arrival_s: float | None        # None for a later turn: sent when the previous turn ends
    tenant: str | None = None
    priority: int | None = None
    conversation: int | None = None
    turn: int = 0


@dataclass(frozen=True)
class LengthDist:
    """Token lengths: fixed (lo == hi), uniform over [lo, hi], or Zipf over [lo, hi] (P(lo + k) ~ (k+1)^-a)."""

    lo: int
    hi: int
    kind: str = "uniform"
    zipf_a: float = 1.2

    @classmethod
    def parse(cls, text: str | int, flag: str, kind: str = "uniform", zipf_a: float = 1.2) -> LengthDist:
        """``"128"`` or ``"64:512"`` (inclusive)."""
        s = str(text).strip()
        lo_s, sep, hi_s = s.partition(":")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ValueError(f"{flag}: {s!r} is not N or A:B (whole numbers of tokens)") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"{flag}: {s!r}: need 1 <= A <= B")
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"--length-dist: {kind!r} is not one of {', '.join(DISTRIBUTIONS)}")
        if kind == "zipf" and not zipf_a > 0:
            raise ValueError(f"--zipf-a: must be positive, got {zipf_a}")
        return cls(lo, hi, kind, zipf_a)

    @property
    def fixed(self) -> bool:
        return self.lo == self.hi

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        if self.fixed:
            return [self.lo] * n
        if self.kind == "uniform":
            return rng.integers(self.lo, self.hi + 1, size=n).tolist()
        ranks = np.arange(1, self.hi - self.lo + 2, dtype=float)
        p = ranks ** -self.zipf_a
        return (self.lo + rng.choice(len(ranks), size=n, p=p / p.sum())).tolist()

    def __str__(self) -> str:
        if self.fixed:
            return str(self.lo)
        return f"{self.lo}:{self.hi}" + (f" zipf(a={self.zipf_a})" if self.kind == "zipf" else "")


def seeded(seed: int, *names: str) -> dict[str, np.random.Generator]:
    """One independent generator per purpose, so that e.g. changing the rate keeps the same lengths."""
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: np.random.default_rng(s) for name, s in zip(names, children)}


def synthetic(num_requests: int, input_dist: LengthDist, output_dist: LengthDist, rate: float,
              burstiness: float = 1.0, multi_turn: int = 1, seed: int = 0) -> list[RequestSpec]:
    """num_requests requests; with multi_turn K they form ceil(n/K) conversations of K turns (the last may be
    shorter), and the arrival process times the conversations' first turns."""
    if num_requests < 1:
        raise ValueError(f"--num-prompts: must be at least 1, got {num_requests}")
    if multi_turn < 1:
        raise ValueError(f"--multi-turn: must be at least 1, got {multi_turn}")
    g = seeded(seed, "input", "output", "arrival")
    ins = input_dist.sample(num_requests, g["input"])
    outs = output_dist.sample(num_requests, g["output"])
    n_conv = -(-num_requests // multi_turn)
    starts = arrival_times(n_conv, rate, burstiness, g["arrival"])
    specs = []
    for i in range(num_requests):
        conv, turn = divmod(i, multi_turn)
        specs.append(RequestSpec(i, ins[i], outs[i], starts[conv] if turn == 0 else None,
                                 conversation=conv if multi_turn > 1 else None, turn=turn))
    return specs


def tenant_names(n: int) -> list[str]:
    return [f"tenant-{i}" for i in range(n)]


def parse_floats(text: str | None, flag: str, n: int) -> list[float] | None:
    """``"1,2,1"`` -> [1.0, 2.0, 1.0], exactly n positive numbers (None when not given)."""
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None
    if len(values) != n:
        raise ValueError(f"{flag}: {len(values)} value(s) given for {n} tenant(s)")
    if any(not v > 0 for v in values):
        raise ValueError(f"{flag}: every value must be positive, got {text!r}")
    return values


def parse_priorities(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--priorities: {text!r} is not a comma-separated list of integers") from None
    return values


def assign_tenants(specs: list[RequestSpec], tenants: list[str], shares: list[float] | None,
                   rng: np.random.Generator) -> None:
    """Each conversation (or single request) goes to a tenant drawn with probability proportional to its share."""
    if len(tenants) <= 1:
        for s in specs:
            s.tenant = tenants[0] if tenants else None
        return
    p = np.asarray(shares if shares else [1.0] * len(tenants), dtype=float)
    p /= p.sum()
    by_chain: dict[object, str] = {}
    for s in specs:
        key = ("c", s.conversation) if s.conversation is not None else ("r", s.index)
        if key not in by_chain:
            by_chain[key] = tenants[int(rng.choice(len(tenants), p=p))]
        s.tenant = by_chain[key]


def assign_priorities(specs: list[RequestSpec], priorities: list[int], per: str, tenants: list[str],
                      rng: np.random.Generator) -> None:
    """per="request": drawn uniformly per request (a conversation keeps its first turn's);
    per="tenant": tenant i always gets priorities[i % len(priorities)]."""
    if per not in ("request", "tenant"):
        raise ValueError(f"--priority-per: {per!r} is not 'request' or 'tenant'")
    if per == "tenant":
        rank = {t: i for i, t in enumerate(tenants)}
        for s in specs:
            s.priority = priorities[rank.get(s.tenant, 0) % len(priorities)]
        return
    by_conv: dict[int, int] = {}
    for s in specs:
        if s.conversation is not None and s.conversation in by_conv:
            s.priority = by_conv[s.conversation]
            continue
        s.priority = priorities[int(rng.integers(len(priorities)))]
        if s.conversation is not None:
            by_conv[s.conversation] = s.priority


def chains(specs: list[RequestSpec]) -> list[list[RequestSpec]]:
    """Group into conversations (turn order), singles as chains of one; ordered by first arrival."""
    groups: dict[object, list[RequestSpec]] = {}
    for s in specs:
        key = ("c", s.conversation) if s.conversation is not None else ("r", s.index)
        groups.setdefault(key, []).append(s)
    out = [sorted(g, key=lambda s: s.turn) for g in groups.values()]
    out.sort(key=lambda g: (g[0].arrival_s or 0.0, g[0].index))
    return out

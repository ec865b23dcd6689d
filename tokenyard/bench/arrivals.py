"""Arrival times of synthetic requests: Poisson, Gamma with a burstiness knob, or all at once.

Gaps between requests are Gamma(shape=b, scale=1/(rate*b)): mean 1/rate whatever b is, coefficient of
variation 1/sqrt(b). b = 1 is the exponential, i.e. a Poisson process; b < 1 is burstier, b > 1 smoother.
"""

from __future__ import annotations

import math

import numpy as np


def parse_rate(text: str | float) -> float:
    """``"inf"`` or a positive number of requests per second."""
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"--request-rate: {text!r} is not a number or 'inf'") from None
    if not rate > 0:
        raise ValueError(f"--request-rate: must be positive (or inf), got {text}")
    return rate


def gaps(n: int, rate: float, burstiness: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """n gaps (seconds) between consecutive arrivals."""
    if not burstiness > 0:
        raise ValueError(f"--burstiness: must be positive, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    rng = rng if rng is not None else np.random.default_rng()
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, rng: np.random.Generator | None = None) -> list[float]:
    """Send times (seconds from the start) of n requests; the first is sent at 0."""
    if n <= 0:
        return []
    g = gaps(n - 1, rate, burstiness, rng)
    return [0.0, *np.cumsum(g).tolist()]

"""Pure functions from request records to benchmark metrics. No I/O, no clocks: testable with hand-made timings.

Definitions (as ``vllm bench serve`` uses them):
  TTFT  send -> first streamed text
  TPOT  (E2E - TTFT) / (output tokens - 1), per request with at least 2 output tokens
  ITL   the gaps between consecutive text chunks of a request, pooled over all requests (also called TBT)
  E2E   send -> end of the response
Percentiles interpolate linearly between order statistics (numpy's default). An empty sample gives None, never 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tokenyard.bench.records import RequestRecord

SLO_KEYS = ("ttft", "tpot", "e2e")

PERCENTILES = (("median", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


# --------------------------------------------------------------------------- latency
def distribution(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean, median, p90, p99, p999 of ``values`` times ``scale`` (None for each when there are none)."""
    if len(values) == 0:
        return {"mean": None, **{name: None for name, _ in PERCENTILES}}
    a = np.asarray(values, dtype=float) * scale
    out: dict[str, float | None] = {"mean": float(a.mean())}
    for name, p in PERCENTILES:
        out[name] = float(np.percentile(a, p))
    return out


def tpot_s(rec: RequestRecord) -> float | None:
    """(E2E - TTFT) / (output - 1); None unless the request succeeded with at least 2 output tokens."""
    if not rec.ok or rec.ttft_s is None or rec.output_tokens < 2:
        return None
    return (rec.latency_s - rec.ttft_s) / (rec.output_tokens - 1)


def itl_s(rec: RequestRecord) -> list[float]:
    """Gaps between the text chunks of one request."""
    t = rec.token_s
    return [b - a for a, b in zip(t, t[1:])]


def latency_summary(records: Iterable[RequestRecord]) -> dict[str, dict[str, float | None]]:
    """ttft_ms, tpot_ms, itl_ms, e2e_ms over the successful requests."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [x for x in map(tpot_s, ok) if x is not None]
    itl = [g for r in ok for g in itl_s(r)]
    e2e = [r.latency_s for r in ok]
    return {
        "ttft_ms": distribution(ttft, 1e3),
        "tpot_ms": distribution(tpot, 1e3),
        "itl_ms": distribution(itl, 1e3),
        "e2e_ms": distribution(e2e, 1e3),
    }


# --------------------------------------------------------------------------- throughput and goodput
def duration_s(records: Iterable[RequestRecord]) -> float:
    """From the run's start (time 0) to the end of the last response or failure."""
    ends = [e for e in (r.end_s for r in records) if e is not None]
    return max(ends, default=0.0)


def throughput(records: Sequence[RequestRecord], duration: float) -> dict[str, float | None]:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in ok)
    if duration <= 0:
        return {"request_throughput": None, "output_throughput": None, "total_token_throughput": None}
    return {
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }


def parse_slo(items: Sequence[str], allowed: Sequence[str] = SLO_KEYS) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slo: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in allowed:
            raise ValueError(f"--slo: {item!r} is not KEY:MS with KEY one of {', '.join(allowed)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--slo: {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--slo: {item!r}: the limit must be positive")
        slo[key] = ms
    return slo


def meets_slo(rec: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """A successful request whose every given metric is within its limit (TPOT of a 1-token answer is 0)."""
    if not rec.ok:
        return False
    values = {"ttft": rec.ttft_s, "tpot": tpot_s(rec) or 0.0, "e2e": rec.latency_s}
    for key, limit in slo_ms.items():
        v = values[key]
        if v is None or v * 1e3 > limit:
            return False
    return True


def goodput(records: Sequence[RequestRecord], slo_ms: dict[str, float], duration: float) -> float | None:
    """Requests per second that met every SLO given."""
    if duration <= 0:
        return None
    return sum(meets_slo(r, slo_ms) for r in records) / duration


def failures(records: Iterable[RequestRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.error_kind for r in records if r.sent and r.error_kind).items()))


def summary(records: Sequence[RequestRecord], slo_ms: dict[str, float] | None = None,
            duration: float | None = None) -> dict:
    """The JSON report's "summary": counts, throughput, latency distributions, goodput, failures."""
    sent = [r for r in records if r.sent]
    dur = duration_s(records) if duration is None else duration
    ok = [r for r in sent if r.ok]
    out = {
        "completed": len(ok),
        "failed": len(sent) - len(ok),
        "not_sent": len(records) - len(sent),
        "duration_s": dur,
        "total_input_tokens": sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in ok),
        "sent_input_tokens": sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in sent),
        "total_output_tokens": sum(r.output_tokens for r in ok),
        **throughput(records, dur),
        **latency_summary(records),
    }
    if slo_ms:
        out["slo_ms"] = dict(slo_ms)
        out["goodput"] = goodput(records, slo_ms, dur)
        out["slo_attainment"] = (sum(meets_slo(r, slo_ms) for r in sent) / len(sent)) if sent else None
    out["failures"] = failures(records)
    return out


def by_group(records: Sequence[RequestRecord], key: str) -> dict[str, dict]:
    """Per tenant or per priority: counts and TTFT/E2E distributions."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        v = getattr(r, key)
        if v is not None and r.sent:
            groups.setdefault(str(v), []).append(r)
    out = {}
    for name in sorted(groups, key=lambda s: (len(s), s)):
        rs = groups[name]
        lat = latency_summary(rs)
        out[name] = {"sent": len(rs), "completed": sum(r.ok for r in rs),
                     "output_tokens": sum(r.output_tokens for r in rs if r.ok),
                     "ttft_ms": lat["ttft_ms"], "e2e_ms": lat["e2e_ms"]}
    return out


# --------------------------------------------------------------------------- fairness (VTC's service)
@dataclass
class ServiceTimeline:
    """Cumulative weighted service per tenant over time, and max - min among the backlogged tenants."""

    times: list[float] = field(default_factory=list)
    service: dict[str, list[float]] = field(default_factory=dict)   # per tenant, at each time
    difference: list[float | None] = field(default_factory=list)     # None while fewer than 2 are backlogged
    max_difference: float | None = None
    max_difference_at: float | None = None
    totals: dict[str, float] = field(default_factory=dict)

    def downsampled(self, max_points: int = 500) -> ServiceTimeline:
        """At most ``max_points`` points; every kept point is an exact one, and the maximum is always kept."""
        n = len(self.times)
        if n <= max_points:
            return self
        keep = sorted(set(np.linspace(0, n - 1, max_points - 1).round().astype(int).tolist())
                      | ({self.times.index(self.max_difference_at)} if self.max_difference_at is not None else set()))
        return ServiceTimeline([self.times[i] for i in keep],
                               {t: [s[i] for i in keep] for t, s in self.service.items()},
                               [self.difference[i] for i in keep], self.max_difference, self.max_difference_at,
                               dict(self.totals))

    def to_json(self) -> dict:
        return {"max_difference": self.max_difference, "max_difference_at_s": self.max_difference_at,
                "totals": self.totals, "t_s": self.times, "difference": self.difference, "service": self.service}


def service_events(records: Iterable[RequestRecord], w_p: float = 1.0,
                   w_q: float = 2.0) -> list[tuple[float, str, float]]:
    """(time, tenant, amount): w_p per prompt token at the first token, w_q per output token as it arrives.

    A chunk counts as one token; tokens the server reported (usage) beyond the chunks seen are charged at the end.
    """
    events = []
    for r in records:
        if r.tenant is None or r.send_s is None or not r.token_s:
            continue
        prompt = r.prompt_tokens if r.prompt_tokens is not None else r.input_len
        first = r.send_s + (r.ttft_s if r.ttft_s is not None else r.token_s[0])
        events.append((first, r.tenant, w_p * prompt))
        events.extend((r.send_s + t, r.tenant, w_q) for t in r.token_s)
        extra = r.output_tokens - len(r.token_s)
        if extra > 0 and r.end_s is not None:
            events.append((r.end_s, r.tenant, w_q * extra))
    return events


def backlog_intervals(records: Iterable[RequestRecord]) -> list[tuple[float, float, str]]:
    """(start, end, tenant): a tenant is backlogged while it has a request sent and not yet finished."""
    return [(r.send_s, r.end_s, r.tenant) for r in records
            if r.tenant is not None and r.send_s is not None and r.end_s is not None]


def service_timeline(events: Sequence[tuple[float, str, float]], intervals: Sequence[tuple[float, float, str]],
                     weights: dict[str, float] | None = None,
                     tenants: Sequence[str] | None = None) -> ServiceTimeline:
    """Sweep the events in time order. At each time t: add the service and backlog starts at t, measure
    max - min of service/weight over the tenants backlogged at t (intervals are closed), then apply the ends."""
    weights = weights or {}
    names = sorted(set(tenants or ()) | {e[1] for e in events} | {i[2] for i in intervals})
    service = dict.fromkeys(names, 0.0)
    backlog = dict.fromkeys(names, 0)
    adds: dict[float, list[tuple[str, float]]] = {}
    for t, tenant, amount in events:
        adds.setdefault(t, []).append((tenant, amount))
    starts: dict[float, list[str]] = {}
    ends: dict[float, list[str]] = {}
    for s, e, tenant in intervals:
        starts.setdefault(s, []).append(tenant)
        ends.setdefault(e, []).append(tenant)
    out = ServiceTimeline(service={n: [] for n in names})
    for t in sorted(set(adds) | set(starts) | set(ends)):
        for tenant, amount in adds.get(t, ()):
            service[tenant] += amount / weights.get(tenant, 1.0)
        for tenant in starts.get(t, ()):
            backlog[tenant] += 1
        active = [service[n] for n in names if backlog[n] > 0]
        diff = (max(active) - min(active)) if len(active) >= 2 else None
        out.times.append(t)
        for n in names:
            out.service[n].append(service[n])
        out.difference.append(diff)
        if diff is not None and (out.max_difference is None or diff > out.max_difference):
            out.max_difference, out.max_difference_at = diff, t
        for tenant in ends.get(t, ()):
            backlog[tenant] -= 1
    out.totals = dict(service)
    return out


def fairness(records: Sequence[RequestRecord], weights: dict[str, float] | None = None, w_p: float = 1.0,
             w_q: float = 2.0, tenants: Sequence[str] | None = None) -> ServiceTimeline:
    return service_timeline(service_events(records, w_p, w_q), backlog_intervals(records), weights, tenants)


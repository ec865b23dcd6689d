"""``tokenyard bench capacity``: the largest request rate a server sustains within a TBT SLO (Sarathi-Serve's
capacity), found by binary search over short Poisson (or Gamma) runs.

A probe at rate r passes when every request succeeds, the P99 of the inter-token gaps (TBT, ITL) is at most
the TBT SLO, and the median TTFT is at most the TTFT SLO when one is given. Probes run --min-rate first (if
it fails, the capacity is below it), then --max-rate (if it passes, the capacity is at least that), then
bisect the bracket with what is left of --probes. Each probe has the same lengths and arrival pattern
(stretched to its rate) but fresh prompt text, so earlier probes leave no prefix-cache hits behind.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from tokenyard.bench import metrics
from tokenyard.bench.client import BenchError
from tokenyard.bench.prompts import PromptBuilder, load_tokenizer
from tokenyard.bench.report import write_json
from tokenyard.bench.runner import (
    build_texts,
    execute,
    failure_line,
    lengths_from_args,
    records_for,
    resolve_model,
    say,
    target_from_args,
    warmup,
)
from tokenyard.bench.workload import synthetic


@dataclass
class Probe:
    rate: float
    passed: bool
    reasons: list[str]
    summary: dict

    def to_json(self) -> dict:
        return {"rate": self.rate, "passed": self.passed, "reasons": self.reasons,
                "p99_tbt_ms": self.summary["itl_ms"]["p99"], "median_ttft_ms": self.summary["ttft_ms"]["median"],
                "summary": self.summary}


def judge(summary: dict, slo_ms: dict[str, float], expected: int) -> list[str]:
    """Why a probe fails (empty: it passes)."""
    reasons = []
    if summary["completed"] < expected:
        reasons.append(f"{expected - summary['completed']} of {expected} requests did not complete")
    tbt = summary["itl_ms"]["p99"]
    if tbt is None:
        reasons.append("no inter-token gaps measured")
    elif tbt > slo_ms["tbt"]:
        reasons.append(f"P99 TBT {tbt:.1f} ms > {slo_ms['tbt']:g} ms")
    if "ttft" in slo_ms:
        ttft = summary["ttft_ms"]["median"]
        if ttft is None or ttft > slo_ms["ttft"]:
            reasons.append(f"median TTFT {'-' if ttft is None else f'{ttft:.1f}'} ms > {slo_ms['ttft']:g} ms")
    return reasons


def plan(passes: dict[float, bool], lo: float, hi: float) -> float | None:
    """The next rate to probe given the results so far, or None when the search is settled."""
    if lo not in passes:
        return lo
    if not passes[lo]:
        return None
    if hi not in passes:
        return hi
    if passes[hi]:
        return None
    good = max(r for r, ok in passes.items() if ok)
    bad = min(r for r, ok in passes.items() if not ok and r > good)
    return (good + bad) / 2


@dataclass
class Search:
    min_rate: float
    max_rate: float
    probes: list[Probe] = field(default_factory=list)

    @property
    def passes(self) -> dict[float, bool]:
        return {p.rate: p.passed for p in self.probes}

    def result(self) -> dict:
        passes = self.passes
        good = [r for r, ok in passes.items() if ok]
        if not good:
            return {"capacity": None, "bound": "below_min_rate" if passes else "unknown", "bracket": None}
        best = max(good)
        worse = [r for r, ok in passes.items() if not ok and r > best]
        return {"capacity": best, "bound": "bracketed" if worse else "at_least",
                "bracket": [best, min(worse)] if worse else [best, None]}


def capacity(args: argparse.Namespace) -> int:
    slo = metrics.parse_slo(args.slo, allowed=("tbt", "ttft"))
    if "tbt" not in slo:
        raise ValueError("--slo: capacity needs tbt:MS (and optionally ttft:MS)")
    for name in ("min_rate", "max_rate"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"--{name.replace('_', '-')}: must be a positive finite rate, got {v}")
    if args.min_rate >= args.max_rate:
        raise ValueError(f"--min-rate {args.min_rate} must be below --max-rate {args.max_rate}")
    if args.probes < 2:
        raise ValueError(f"--probes: need at least 2 (the two ends), got {args.probes}")
    in_dist, out_dist = lengths_from_args(args)
    if out_dist.lo < 2:
        raise ValueError("--output-len: TBT needs at least 2 output tokens per request")
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts: must be at least 1, got {args.num_prompts}")
    target = target_from_args(args)
    search = Search(args.min_rate, args.max_rate)
    error = None
    interrupted = False
    try:
        target.model = resolve_model(target)
        builder = PromptBuilder(load_tokenizer(args.tokenizer))
        warmup(target, builder, args.warmup)
        while len(search.probes) < args.probes:
            rate = plan(search.passes, args.min_rate, args.max_rate)
            if rate is None:
                break
            k = len(search.probes)
            specs = synthetic(args.num_prompts, in_dist, out_dist, rate, args.burstiness, 1, args.seed)
            texts = build_texts(builder, specs, target.endpoint, args.seed + 7919 * (k + 1))
            records = records_for(specs)
            interrupted = execute(target, specs, texts, records, args.progress, f"probe {k + 1} @ {rate:.3g}/s")
            recs = [records[s.index] for s in specs]
            summary = metrics.summary(recs)
            reasons = judge(summary, slo, len(specs))
            if interrupted:
                reasons.append("interrupted")
            probe = Probe(rate, not reasons, reasons, summary)
            search.probes.append(probe)
            tbt, ttft = summary["itl_ms"]["p99"], summary["ttft_ms"]["median"]
            print(f"probe {k + 1}/{args.probes}: {rate:.4g} req/s: P99 TBT "
                  f"{'-' if tbt is None else f'{tbt:.1f}'} ms, median TTFT {'-' if ttft is None else f'{ttft:.1f}'} "
                  f"ms, {summary['completed']}/{len(specs)} ok, {summary['request_throughput'] or 0:.3g} req/s "
                  f"served -> {'pass' if probe.passed else 'FAIL: ' + '; '.join(reasons)}", flush=True)
            line = failure_line(summary, recs)
            if line:
                say(line)
            if interrupted:
                break
    except BenchError as e:
        error = str(e)
        say(error)
    result = search.result()
    slo_text = f"P99 TBT <= {slo['tbt']:g} ms" + (f" and median TTFT <= {slo['ttft']:g} ms" if "ttft" in slo else "")
    if error is None:
        if result["capacity"] is None:
            print(f"capacity: below --min-rate {args.min_rate:g} req/s ({slo_text} not met there)")
        elif result["bound"] == "at_least":
            print(f"capacity: at least {result['capacity']:.4g} req/s (--max-rate still meets {slo_text})")
        else:
            lo, hi = result["bracket"]
            print(f"capacity: {lo:.4g} req/s (largest rate meeting {slo_text}; {hi:.4g} req/s does not)")
    if args.result_json:
        report = {"label": args.label, "server": {"base_url": target.base_url, "model": target.model,
                                                  "endpoint": target.endpoint},
                  "config": {k: v for k, v in vars(args).items() if k not in ("func", "api_key")},
                  "error": error, "interrupted": interrupted, "slo_ms": slo, **result,
                  "probes": [p.to_json() for p in search.probes]}
        say(f"wrote {write_json(args.result_json, report)}")
    if interrupted:
        return 130
    return 1 if error is not None or not search.probes else 0

"""Fairness between tenants: the same multi-tenant trace replayed against tokenyard under each policy.

Four tenants share one server. Their requests come from the Azure LLM conversation trace (arrival times and
prompt/output lengths, scaled); one tenant sends five times the others' share, enough to keep the server
backlogged on its own. For each policy in turn (never two servers at once) it starts ``tokenyard serve
--scheduling-policy P`` on the bundled SmolLM2, runs ``tokenyard bench serve`` with that workload, reads the
server's per-tenant service from /metrics and stops it. Then it compares:

- the light tenants' P99 TTFT (their requests pooled) and the heavy tenant's;
- the fairness metric ``tokenyard bench`` reports: max - min cumulative weighted service (w_p per prompt
  token, w_q per output token) among the tenants with requests in flight, over time (client side). It grows
  under any work-conserving policy when the light tenants ask for less than their share;
- what VTC bounds: for each pair of tenants and each span in which both have requests in flight, how far
  their service difference moves within the span (max - min of S_f - S_g), against VTC's bound
  2 * max(w_p * L_input, w_q * M), M = the server's KV capacity in tokens.

    python benchmarks/bench_fairness.py                       # fcfs vs vtc, the default workload
    python benchmarks/bench_fairness.py --num-prompts 80 --policies fcfs,vtc,vtc+priority

Writes benchmarks/results/fairness.json (workload, machine, per-policy summaries and ratios) and
benchmarks/results/fairness.png (service difference over time; per-tenant P99 TTFT), and each run's
bench JSON and server log under benchmarks/results/fairness/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
from compare import Peer, Server, free_port, machine, tail  # noqa: E402

DEFAULT_TRACE = REPO.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
console = Console(width=150)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policies", default="fcfs,vtc", help="comma-separated scheduling policies, run in turn")
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--trace-start", type=int, default=0)
    p.add_argument("--num-prompts", type=int, default=160)
    p.add_argument("--trace-time-scale", type=float, default=2.0, help="2 = half the trace's request rate")
    p.add_argument("--trace-length-scale", type=float, default=0.25)
    p.add_argument("--max-input-len", type=int, default=512)
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--tenant-weights", default="5,1,1,1", help="share of the requests per tenant (tenant-0 first)")
    p.add_argument("--w-p", type=float, default=1.0)
    p.add_argument("--w-q", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--server-args", default="--max-num-seqs 16", help="more `tokenyard serve` flags (all runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench-timeout", type=float, default=1800.0)
    p.add_argument("--out", default=str(HERE / "results" / "fairness.json"))
    p.add_argument("--reuse", action="store_true",
                   help="do not run servers: recompute the report from the per-policy JSON files of a previous run")
    return p.parse_args(argv)


def server_peer(args: argparse.Namespace, policy: str) -> Peer:
    cmd = [sys.executable, "-m", "tokenyard.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
           "--num-threads", str(args.threads), "--no-access-log", "--scheduling-policy", policy,
           "--vtc-w-p", str(args.w_p), "--vtc-w-q", str(args.w_q), *shlex.split(args.server_args)]
    return Peer(f"tokenyard-{policy}", cmd, "/health")


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_bench_serve(url: str, bench_args: list[str], result: Path, log: Path,
                    timeout: float) -> tuple[dict, dict[str, float]]:
    """Run ``tokenyard bench serve`` against ``url``; its JSON report and the server's /metrics after it."""
    cmd = [sys.executable, "-m", "tokenyard.cli", "bench", "serve", "--base-url", url, *bench_args,
           "--result-json", str(result), "--no-progress"]
    console.print(f"[dim]$ {shlex.join(cmd)}[/dim]")
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"bench exited {r.returncode}:\n{tail(log)}")
    return json.loads(result.read_text()), scrape(url)


@contextmanager
def started(name: str, peer: Peer, log: Path) -> Iterator[tuple[Server, float]]:
    """A tokenyard server running for the block (and its seconds to ready); stopped after it, whatever happens."""
    log.write_text("")
    server = Server(peer, log)
    console.print(f"[bold]{name}[/bold]: starting {shlex.join(peer.command)}")
    try:
        yield server, server.start(timeout_s=600)
    finally:
        status = server.stop()
        console.print(f"[dim]{name}: server stopped (status {status})[/dim]")


def run_policy(args: argparse.Namespace, policy: str, outdir: Path) -> dict:
    safe = policy.replace("+", "-")
    with started(policy, server_peer(args, policy), outdir / f"{safe}.server.log") as (server, ready_s):
        t0 = time.monotonic()
        report, metrics = run_bench_serve(server.url, [
            "--trace", args.trace, "--trace-start", str(args.trace_start), "--num-prompts", str(args.num_prompts),
            "--trace-time-scale", str(args.trace_time_scale), "--trace-length-scale", str(args.trace_length_scale),
            "--max-input-len", str(args.max_input_len), "--max-output-len", str(args.max_output_len),
            "--tenants", str(len(args.tenant_weights.split(","))), "--tenant-weights", args.tenant_weights,
            "--w-p", str(args.w_p), "--w-q", str(args.w_q), "--seed", str(args.seed), "--label", policy,
        ], outdir / f"{safe}.json", outdir / f"{safe}.bench.log", args.bench_timeout)
        report["server_metrics"] = {k: v for k, v in metrics.items() if k.startswith("tokenyard_tenant_")
                                    or k in ("tokenyard_kv_blocks_total", "tokenyard_preemptions_total")}
        report["ready_s"] = ready_s
        report["wall_s"] = time.monotonic() - t0
        return report


def records_of(report: dict) -> list:
    """RequestRecords back from a bench JSON (chunk times rebuilt from TTFT and the inter-chunk gaps)."""
    from tokenyard.bench.records import RequestRecord

    out = []
    for r in report["requests"]:
        rec = RequestRecord(r["index"], r["input_len"], r["output_len"], r["tenant"], r["priority"])
        rec.sent, rec.send_s, rec.ttft_s, rec.latency_s = r["send_s"] is not None, r["send_s"], r["ttft_s"], \
            r["latency_s"]
        rec.prompt_tokens, rec.output_tokens = r["prompt_tokens"], r["output_tokens"] or 0
        if r["ttft_s"] is not None:
            rec.token_s = list(np.cumsum([r["ttft_s"], *r["itl_s"]]))
        rec.error_kind = r["error_kind"]
        out.append(rec)
    return out


def pair_span_difference(report: dict, w_p: float, w_q: float) -> float | None:
    """Max over tenant pairs and over spans with both in flight of max - min (S_f - S_g) within the span."""
    from tokenyard.bench.metrics import backlog_intervals, service_events

    recs = records_of(report)
    events = sorted(service_events(recs, w_p, w_q))
    intervals = backlog_intervals(recs)
    tenants = sorted({t for _, _, t in intervals})
    points = sorted({t for t, _, _ in events} | {s for s, _, _ in intervals} | {e for _, e, _ in intervals})
    service = dict.fromkeys(tenants, 0.0)
    worst = None
    spans: dict[tuple[str, str], tuple[float, float]] = {}
    ei = 0
    for t in points:
        while ei < len(events) and events[ei][0] <= t:
            service[events[ei][1]] += events[ei][2]
            ei += 1
        live = {n for s, e, n in intervals if s <= t <= e}
        for i, f in enumerate(tenants):
            for g in tenants[i + 1:]:
                if f in live and g in live:
                    d = service[f] - service[g]
                    lo, hi = spans.get((f, g), (d, d))
                    spans[(f, g)] = (min(lo, d), max(hi, d))
                    worst = max(worst or 0.0, spans[(f, g)][1] - spans[(f, g)][0])
                else:
                    spans.pop((f, g), None)
    return worst


def p99(values: list[float]) -> float | None:
    return float(np.percentile(values, 99)) * 1000 if values else None


def summarize(report: dict, heavy: str, block_size: int, w_p: float, w_q: float) -> dict:
    reqs = [r for r in report["requests"] if r["ok"]]
    light = [r["ttft_s"] for r in reqs if r["tenant"] != heavy and r["ttft_s"] is not None]
    heavy_ttft = [r["ttft_s"] for r in reqs if r["tenant"] == heavy and r["ttft_s"] is not None]
    fair = report.get("fairness") or {}
    diff = [d for d in fair.get("difference", []) if d is not None]
    kv_tokens = int(report["server_metrics"].get("tokenyard_kv_blocks_total", 0)) * block_size
    l_input = max((r["prompt_tokens"] or r["input_len"] for r in reqs), default=0)
    s = report["summary"]
    return {
        "completed": s["completed"], "failed": s["failed"], "duration_s": s["duration_s"],
        "output_throughput": s["output_throughput"],
        "light_ttft_p99_ms": p99(light), "light_ttft_median_ms": float(np.median(light)) * 1000 if light else None,
        "heavy_ttft_p99_ms": p99(heavy_ttft),
        "per_tenant_ttft_p99_ms": {t: g["ttft_ms"]["p99"] for t, g in (report.get("by_tenant") or {}).items()},
        "max_service_difference": max(diff) if diff else None,
        "max_pair_span_difference": pair_span_difference(report, w_p, w_q),
        "vtc_bound": 2 * max(w_p * l_input, w_q * kv_tokens), "L_input": l_input, "M_kv_tokens": kv_tokens,
        "preemptions": report["server_metrics"].get("tokenyard_preemptions_total"),
        "server_tenant_service": {k.split('"')[1]: v for k, v in report["server_metrics"].items()
                                  if k.startswith("tokenyard_tenant_service_total{")},
    }


def plot(path: Path, reports: dict[str, dict], summaries: dict[str, dict], heavy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for policy, rep in reports.items():
        fair = rep.get("fairness") or {}
        t, d = fair.get("t_s", []), fair.get("difference", [])
        pts = [(x, y) for x, y in zip(t, d) if y is not None]
        if pts:
            ax1.plot([x for x, _ in pts], [y for _, y in pts], label=policy, lw=1.2)
    bound = max(s["vtc_bound"] for s in summaries.values())
    ax1.axhline(bound, color="grey", ls="--", lw=1, label=f"VTC bound {bound:,.0f}")
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("max - min weighted service among backlogged tenants")
    ax1.set_title("service difference over time")
    ax1.legend()
    tenants = sorted({t for s in summaries.values() for t in s["per_tenant_ttft_p99_ms"]})
    width = 0.8 / max(len(summaries), 1)
    for i, (policy, s) in enumerate(summaries.items()):
        vals = [(s["per_tenant_ttft_p99_ms"].get(t) or 0) / 1000 for t in tenants]
        ax2.bar(np.arange(len(tenants)) + i * width, vals, width, label=policy)
    ax2.set_xticks(np.arange(len(tenants)) + width * (len(summaries) - 1) / 2)
    ax2.set_xticklabels([f"{t}{' (heavy)' if t == heavy else ''}" for t in tenants])
    ax2.set_ylabel("P99 TTFT (s)")
    ax2.set_title("P99 time to first token per tenant")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    out = Path(args.out)
    outdir = out.with_suffix("")
    outdir.mkdir(parents=True, exist_ok=True)
    heavy = "tenant-0"
    block_size = 16
    for flag in shlex.split(args.server_args):
        if flag.startswith("--block-size"):
            raise SystemExit("bench_fairness.py: keep the default --block-size (the bound's M assumes 16)")
    reports, summaries = {}, {}
    for policy in policies:
        try:
            if args.reuse:
                reports[policy] = json.loads((outdir / f"{policy.replace('+', '-')}.json").read_text())
                reports[policy]["server_metrics"] = reports[policy].get("server_metrics") or {}
            else:
                reports[policy] = run_policy(args, policy, outdir)
                (outdir / f"{policy.replace('+', '-')}.json").write_text(json.dumps(reports[policy]))
            summaries[policy] = summarize(reports[policy], heavy, block_size, args.w_p, args.w_q)
        except Exception as e:  # noqa: BLE001 - report and go on with the next policy
            console.print(f"[red]{policy}: {e}[/red]")
    if not summaries:
        return 1
    table = Table(title=f"fairness: {args.num_prompts} Azure-conv requests, tenant shares {args.tenant_weights} "
                        f"(tenant-0 heavy), {machine()['cpu']}, {args.threads} threads")
    for col in ("policy", "done", "out tok/s", "light P99 TTFT s", "light med TTFT s", "heavy P99 TTFT s",
                "max service diff", "max pair-span diff", "VTC bound", "preempted"):
        table.add_column(col, justify="right")
    for policy, s in summaries.items():
        def f(v, scale=1.0, digits=2):
            return "-" if v is None else f"{v * scale:,.{digits}f}"
        table.add_row(policy, f"{s['completed']}/{s['completed'] + s['failed']}", f(s["output_throughput"], 1, 1),
                      f(s["light_ttft_p99_ms"], 1e-3), f(s["light_ttft_median_ms"], 1e-3),
                      f(s["heavy_ttft_p99_ms"], 1e-3), f(s["max_service_difference"], 1, 0),
                      f(s["max_pair_span_difference"], 1, 0),
                      f(s["vtc_bound"], 1, 0), f(s["preemptions"], 1, 0))
    console.print(table)
    ratios = {}
    if "fcfs" in summaries:
        base = summaries["fcfs"]
        for policy, s in summaries.items():
            if policy != "fcfs" and s["light_ttft_p99_ms"] and base["light_ttft_p99_ms"]:
                ratios[policy] = {
                    "light_ttft_p99_vs_fcfs": s["light_ttft_p99_ms"] / base["light_ttft_p99_ms"],
                    "max_service_difference_vs_fcfs": (s["max_service_difference"] / base["max_service_difference"]
                                                       if base["max_service_difference"] else None),
                    "max_pair_span_difference_vs_fcfs": (
                        s["max_pair_span_difference"] / base["max_pair_span_difference"]
                        if base["max_pair_span_difference"] else None),
                    "output_throughput_vs_fcfs": s["output_throughput"] / base["output_throughput"],
                }
                console.print(f"{policy}: light tenants' P99 TTFT = "
                              f"{ratios[policy]['light_ttft_p99_vs_fcfs']:.2f} x fcfs's; max pair-span service "
                              f"difference {s['max_pair_span_difference']:,.0f} vs fcfs's "
                              f"{base['max_pair_span_difference']:,.0f} (bound {s['vtc_bound']:,.0f}); "
                              f"throughput {ratios[policy]['output_throughput_vs_fcfs']:.2f} x fcfs's")
    png = out.with_suffix(".png")
    plot(png, reports, summaries, heavy)
    out.write_text(json.dumps({"config": vars(args), "machine": machine(), "summaries": summaries,
                               "ratios": ratios}, indent=2))
    console.print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

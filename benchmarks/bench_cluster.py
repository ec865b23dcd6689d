"""Dispatch and migration across instances: the same bursty load against `tokenyard serve --instances N` under
each policy, one server at a time.

Each variant starts ``tokenyard serve --instances N --instance-threads 1`` on the bundled SmolLM2 with a small KV
pool per instance (so memory, which Llumnix's freeness measures, runs short under a burst), drives it with
``tokenyard bench serve`` (Gamma arrivals, CV 4 by default: ``--burstiness 1/CV^2``; mixed lengths), reads the
migration counters from /metrics and stops it. Compared: P99 TTFT and P99 TBT (inter-token latency), output
throughput. Variants: ``round-robin`` and ``least-loaded`` without migration, ``freeness`` without and with it.

    python benchmarks/bench_cluster.py
    python benchmarks/bench_cluster.py --num-prompts 60 --request-rate 1.5 --variants freeness+migration,round-robin

Writes benchmarks/results/cluster.json (machine, workload, per-variant summaries, ratios vs round-robin) and
benchmarks/results/cluster.png (TTFT and TBT CDFs), and each run's bench JSON and server log under
benchmarks/results/cluster/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))
from bench_fairness import run_bench_serve, started  # noqa: E402
from compare import Peer, free_port, machine  # noqa: E402

console = Console(width=150)

VARIANTS = {
    "round-robin": ["--dispatch", "round-robin", "--no-migration"],
    "least-loaded": ["--dispatch", "least-loaded", "--no-migration"],
    "freeness": ["--dispatch", "freeness", "--no-migration"],
    "freeness+migration": ["--dispatch", "freeness", "--migration"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=0.8)
    p.add_argument("--cv", type=float, default=4.0, help="coefficient of variation of the Gamma inter-arrivals")
    p.add_argument("--input-len", default="32:512")
    p.add_argument("--output-len", default="16:128")
    p.add_argument("--server-args", default="--num-kv-blocks 160 --max-num-seqs 16",
                   help="more `tokenyard serve` flags (every variant; per instance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench-timeout", type=float, default=1800.0)
    p.add_argument("--out", default=str(HERE / "results" / "cluster.json"))
    return p.parse_args(argv)


def server_peer(args: argparse.Namespace, variant: str) -> Peer:
    cmd = [sys.executable, "-m", "tokenyard.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
           "--no-access-log", "--instances", str(args.instances), "--instance-threads", "1",
           *VARIANTS[variant], *shlex.split(args.server_args)]
    return Peer(f"tokenyard-{variant}", cmd, "/health")


def ms(d: dict, key: str, q: str) -> float | None:
    return (d.get(key) or {}).get(q)


def summarize(report: dict) -> dict:
    s = report["summary"]
    m = report["server_metrics"]
    return {
        "completed": s["completed"], "failed": s["failed"], "duration_s": s["duration_s"],
        "output_throughput": s["output_throughput"],
        "ttft_p50_ms": ms(s, "ttft_ms", "median"), "ttft_p99_ms": ms(s, "ttft_ms", "p99"),
        "tbt_p50_ms": ms(s, "itl_ms", "median"), "tbt_p99_ms": ms(s, "itl_ms", "p99"),
        "tbt_p999_ms": ms(s, "itl_ms", "p999"),
        "migrations": m.get("tokenyard_migrations_total", 0.0),
        "migrations_aborted": m.get("tokenyard_migrations_aborted_total", 0.0),
        "preemptions": m.get("tokenyard_preemptions_total", 0.0),
    }


def plot(path: Path, reports: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, rep in reports.items():
        ttft = sorted(r["ttft_s"] for r in rep["requests"] if r["ok"] and r["ttft_s"] is not None)
        itl = sorted(g for r in rep["requests"] if r["ok"] for g in r["itl_s"])
        for ax, vals in ((ax1, ttft), (ax2, itl)):
            if vals:
                ax.plot(vals, np.linspace(0, 1, len(vals)), label=name, lw=1.2)
    ax1.set_xscale("log")
    ax2.set_xscale("log")
    ax1.set_xlabel("TTFT (s)")
    ax2.set_xlabel("time between tokens (s)")
    for ax in (ax1, ax2):
        ax.set_ylabel("fraction of requests" if ax is ax1 else "fraction of gaps")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_title("time to first token (CDF)")
    ax2.set_title("inter-token latency (CDF)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    outdir = out.with_suffix("")
    outdir.mkdir(parents=True, exist_ok=True)
    burstiness = 1.0 / args.cv ** 2
    reports, summaries = {}, {}
    for v in variants:
        safe = v.replace("+", "-")
        with started(v, server_peer(args, v), outdir / f"{safe}.server.log") as (server, ready_s):
            t0 = time.monotonic()
            report, metrics = run_bench_serve(server.url, [
                "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
                "--burstiness", str(burstiness), "--input-len", args.input_len, "--output-len", args.output_len,
                "--seed", str(args.seed), "--label", v,
            ], outdir / f"{safe}.json", outdir / f"{safe}.bench.log", args.bench_timeout)
            report["server_metrics"] = {k: v2 for k, v2 in metrics.items() if k.startswith("tokenyard_")}
            report["ready_s"], report["wall_s"] = ready_s, time.monotonic() - t0
        reports[v], summaries[v] = report, summarize(report)
        console.print(v, summaries[v])
    base = summaries.get("round-robin")
    ratios = {}
    if base:
        for v, s in summaries.items():   # > 1: better than round-robin
            ratios[v] = {k: (base[k] / s[k] if s[k] else None) for k in ("ttft_p99_ms", "tbt_p99_ms")}
            ratios[v]["output_throughput"] = s["output_throughput"] / base["output_throughput"]
    table = Table(title=f"{args.instances} instances, Gamma CV {args.cv:g} at {args.request_rate:g} req/s, "
                        f"{args.num_prompts} requests")
    for col in ("variant", "TTFT P50 ms", "TTFT P99 ms", "TBT P50 ms", "TBT P99 ms", "out tok/s", "migrations",
                "preemptions", "TTFT P99 vs RR", "TBT P99 vs RR"):
        table.add_column(col, justify="right")
    for v, s in summaries.items():
        r = ratios.get(v, {})
        table.add_row(v, f"{s['ttft_p50_ms']:.0f}", f"{s['ttft_p99_ms']:.0f}", f"{s['tbt_p50_ms']:.0f}",
                      f"{s['tbt_p99_ms']:.0f}", f"{s['output_throughput']:.1f}", f"{s['migrations']:.0f}",
                      f"{s['preemptions']:.0f}", f"{r.get('ttft_p99_ms') or 0:.2f}x",
                      f"{r.get('tbt_p99_ms') or 0:.2f}x")
    console.print(table)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "summaries": summaries, "ratios": ratios},
                              indent=1))
    plot(out.with_suffix(".png"), reports)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

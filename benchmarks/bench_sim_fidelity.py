"""Simulator fidelity: the same workload measured on the real server and simulated with this machine's profile.

1. ``tokenyard profile`` (unless ``--profile FILE`` is given): the real engine's step times on this machine.
2. ``tokenyard serve`` on the bundled model, driven by ``tokenyard bench serve`` (the workload below), stopped.
3. ``tokenyard simulate`` with the same workload flags and seed, on the profile.

Then P50/P99 of TTFT, TPOT, ITL and E2E, real against simulated, with their ratio (the goal: within 10% for
TTFT and TPOT). Never two heavy jobs at once: the profile, the server run and the simulation run one by one.

    python benchmarks/bench_sim_fidelity.py
    python benchmarks/bench_sim_fidelity.py --profile benchmarks/results/sim/profile.json --num-prompts 32

Writes benchmarks/results/sim/fidelity.json (machine, workload, both summaries, ratios) and fidelity.png (CDFs).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))
from bench_fairness import run_bench_serve, started  # noqa: E402
from compare import Peer, free_port, machine  # noqa: E402

console = Console(width=140)
METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None, help="use this profile instead of running `tokenyard profile`")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", default="2")
    p.add_argument("--input-len", default="64:512")
    p.add_argument("--output-len", default="128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra `tokenyard serve` (and profile) engine flags")
    p.add_argument("--outdir", default=str(HERE / "results" / "sim"))
    return p.parse_args(argv)


def workload(args: argparse.Namespace) -> list[str]:
    return ["--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
            "--input-len", args.input_len, "--output-len", args.output_len, "--seed", str(args.seed)]


def run(cmd: list[str], log: Path, timeout: float) -> None:
    console.print(f"[dim]$ {shlex.join(cmd)}[/dim]")
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[3]} exited {r.returncode}; see {log}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    extra = shlex.split(args.server_args)
    profile = Path(args.profile) if args.profile else out / "profile.json"
    if not args.profile:
        t0 = time.monotonic()
        run([py, "-m", "tokenyard.cli", "profile", "-o", str(profile), *extra], out / "profile.log", 3600)
        console.print(f"profile: {time.monotonic() - t0:.0f} s")
    prof = json.loads(profile.read_text())

    peer = Peer("tokenyard", [py, "-m", "tokenyard.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
                              "--no-access-log", *extra], "/health")
    with started("tokenyard", peer, out / "fidelity.server.log") as (server, _):
        real, _ = run_bench_serve(server.url, [*workload(args), "--label", "real"], out / "fidelity-real.json",
                                  out / "fidelity-real.log", 3600)
    sim_json = out / "fidelity-sim.json"
    run([py, "-m", "tokenyard.cli", "simulate", *workload(args), "--cost-model", str(profile),
         "--max-model-len", str(prof["max_model_len"]), "--max-num-batched-tokens", str(prof["max_num_batched_tokens"]),
         "--max-num-seqs", str(prof["max_num_seqs"]), "--label", "simulated", "--result-json", str(sim_json)],
        out / "fidelity-sim.log", 600)
    sim = json.loads(sim_json.read_text())

    table = Table(title=f"real vs simulated: {args.num_prompts} requests at {args.request_rate}/s, prompts "
                        f"{args.input_len}, output {args.output_len} ({machine()['cpu']})")
    for col in ("metric", "real P50", "sim P50", "sim/real", "real P99", "sim P99", "sim/real"):
        table.add_column(col, justify="right")
    rows = {}
    for key, name in METRICS:
        r, s = real["summary"][key], sim["summary"][key]
        row = {}
        for q in ("median", "p99"):
            row[q] = {"real": r[q], "sim": s[q], "ratio": s[q] / r[q] if r[q] else None}
        rows[name] = row
        table.add_row(name, *(f"{row[q][k]:.4g}" if k != "ratio" else f"{row[q][k]:.3f}"
                              for q in ("median", "p99") for k in ("real", "sim", "ratio")))
    table.add_row("out tok/s", f"{real['summary']['output_throughput']:.1f}",
                  f"{sim['summary']['output_throughput']:.1f}",
                  f"{sim['summary']['output_throughput'] / real['summary']['output_throughput']:.3f}", "", "", "")
    console.print(table)
    report = {"machine": machine(), "workload": workload(args), "profile": str(profile),
              "profile_fit": prof.get("fit"), "device": prof.get("device"), "metrics": rows,
              "real": real["summary"], "sim": sim["summary"], "simulation": sim["simulation"]}
    path = out / "fidelity.json"
    path.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {path}")
    try:
        plot(out / "fidelity.png", real, sim)
    except Exception as e:  # noqa: BLE001 - the table and JSON are the result
        console.print(f"no plot: {e}")
    return 0


def plot(path: Path, real: dict, sim: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rep: dict, what: str) -> list[float]:
        vals = []
        for r in rep["requests"]:
            if not r["ok"]:
                continue
            if what == "ttft":
                vals.append(r["ttft_s"] * 1e3)
            elif what == "tpot" and r["output_tokens"] > 1:
                vals.append((r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) * 1e3)
            elif what == "itl":
                vals.extend(x * 1e3 for x in r["itl_s"])
        return sorted(vals)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, what in zip(axes, ("ttft", "tpot", "itl")):
        for rep, label in ((real, "real"), (sim, "simulated")):
            v = series(rep, what)
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label)
        ax.set_xlabel(f"{what.upper()} (ms)")
        ax.set_ylabel("CDF")
        ax.legend()
    fig.suptitle("tokenyard: real server vs simulator on this machine's profile")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

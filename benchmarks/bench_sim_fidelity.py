"""Simulator fidelity: the same workload measured on the real server and simulated with this machine's profiles.

1. ``tokenyard profile`` (unless ``--profile FILE`` is given): the engine's steps timed by probes, quietly.
2. A calibration run: ``tokenyard serve --step-log`` driven by ``tokenyard bench serve`` with the same kind of
   workload but another seed (other prompts, lengths and arrival times); ``tokenyard profile --from-step-log``
   fits the same cost model to the steps it served.
3. The target: ``tokenyard serve`` driven by ``tokenyard bench serve`` (seed 0), ``--real-runs`` times, to show
   how much the real system varies from run to run.
4. ``tokenyard simulate`` of the target workload (same flags and seed) on each profile.

Then P50/P99 of TTFT, TPOT, ITL and E2E: the real runs (mean and range) against each simulation (the goal:
within 10% for TTFT and TPOT). Never two heavy jobs at once: everything runs one after another.

    python benchmarks/bench_sim_fidelity.py
    python benchmarks/bench_sim_fidelity.py --profile benchmarks/results/sim/profile.json --real-runs 1

Writes benchmarks/results/sim/fidelity.json and fidelity.png (CDFs of TTFT, TPOT, ITL).
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
    p.add_argument("--calibration-seed", type=int, default=1)
    p.add_argument("--real-runs", type=int, default=2)
    p.add_argument("--server-args", default="", help="extra `tokenyard serve` (and profile) engine flags")
    p.add_argument("--outdir", default=str(HERE / "results" / "sim"))
    return p.parse_args(argv)


def workload(args: argparse.Namespace, seed: int | None = None) -> list[str]:
    return ["--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
            "--input-len", args.input_len, "--output-len", args.output_len,
            "--seed", str(args.seed if seed is None else seed)]


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

    def serve_peer(*more: str) -> Peer:
        return Peer("tokenyard", [py, "-m", "tokenyard.cli", "serve", "--host", "127.0.0.1", "--port",
                                  str(free_port()), "--no-access-log", *extra, *more], "/health")

    steplog = out / "calibration-steps.jsonl"
    steplog.unlink(missing_ok=True)
    with started("calibration", serve_peer("--step-log", str(steplog)), out / "calibration.server.log") as (srv, _):
        run_bench_serve(srv.url, [*workload(args, args.calibration_seed), "--label", "calibration"],
                        out / "calibration.json", out / "calibration.log", 3600)
    served_profile = out / "profile-serving.json"
    run([py, "-m", "tokenyard.cli", "profile", "--from-step-log", str(steplog), "--copies-from", str(profile),
         "-o", str(served_profile)], out / "profile-serving.log", 600)

    reals = []
    for k in range(args.real_runs):
        with started(f"target {k + 1}", serve_peer(), out / f"fidelity-real-{k + 1}.server.log") as (srv, _):
            rep, _ = run_bench_serve(srv.url, [*workload(args), "--label", f"real {k + 1}"],
                                     out / f"fidelity-real-{k + 1}.json", out / f"fidelity-real-{k + 1}.log", 3600)
            reals.append(rep)
    sims = {}
    for name, path in (("probes", profile), ("serving log", served_profile)):
        sim_json = out / f"fidelity-sim-{name.replace(' ', '-')}.json"
        run([py, "-m", "tokenyard.cli", "simulate", *workload(args), "--cost-model", str(path),
             "--max-model-len", str(prof["max_model_len"]),
             "--max-num-batched-tokens", str(prof["max_num_batched_tokens"]),
             "--max-num-seqs", str(prof["max_num_seqs"]), "--label", f"simulated ({name})",
             "--result-json", str(sim_json)], out / "fidelity-sim.log", 600)
        sims[name] = json.loads(sim_json.read_text())

    table = Table(title=f"real vs simulated: {args.num_prompts} requests at {args.request_rate}/s, prompts "
                        f"{args.input_len}, output {args.output_len} ({machine()['cpu']}, 2 threads)")
    for col in ("metric", "real (mean; runs)", *(f"sim: {n}" for n in sims), *(f"{n} / real" for n in sims)):
        table.add_column(col, justify="right")
    rows: dict = {}
    for key, name in METRICS:
        for q, qn in (("median", "P50"), ("p99", "P99")):
            vals = [r["summary"][key][q] for r in reals]
            mean = sum(vals) / len(vals)
            row = {"real_runs": vals, "real_mean": mean}
            for n, srep in sims.items():
                row[n] = srep["summary"][key][q]
                row[f"{n}_ratio"] = row[n] / mean if mean else None
            rows[f"{name} {qn}"] = row
            table.add_row(f"{name} {qn}", f"{mean:.4g}; " + ", ".join(f"{v:.4g}" for v in vals),
                          *(f"{row[n]:.4g}" for n in sims), *(f"{row[f'{n}_ratio']:.3f}" for n in sims))
    tp = [r["summary"]["output_throughput"] for r in reals]
    table.add_row("out tok/s", f"{sum(tp) / len(tp):.1f}; " + ", ".join(f"{v:.1f}" for v in tp),
                  *(f"{s['summary']['output_throughput']:.1f}" for s in sims.values()),
                  *(f"{s['summary']['output_throughput'] / (sum(tp) / len(tp)):.3f}" for s in sims.values()))
    console.print(table)
    served = json.loads(served_profile.read_text())
    report = {"machine": machine(), "workload": workload(args), "calibration_seed": args.calibration_seed,
              "profiles": {"probes": {"path": str(profile), "fit": prof.get("fit"), "device": prof.get("device")},
                           "serving log": {"path": str(served_profile), "fit": served.get("fit")}},
              "metrics": rows, "real": [r["summary"] for r in reals],
              "sim": {n: {"summary": s["summary"], "simulation": s["simulation"]} for n, s in sims.items()}}
    path = out / "fidelity.json"
    path.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {path}")
    try:
        plot(out / "fidelity.png", reals[0], sims)
    except Exception as e:  # noqa: BLE001 - the table and JSON are the result
        console.print(f"no plot: {e}")
    return 0


def plot(path: Path, real: dict, sims: dict[str, dict]) -> None:
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
        for rep, label in ((real, "real (run 1)"), *((s, f"simulated ({n})") for n, s in sims.items())):
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

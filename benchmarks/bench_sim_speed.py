"""Simulator speed: requests simulated per wall second on a 10,000-request trace, beside Vidur's on the same trace.

The workload is the one ``benchmarks/vidur/run_vidur.sh`` gives Vidur: the first N rows of the Azure conversation
trace in real time, prompt + output clamped to 4096 tokens (the output to 4095, the prompt cut), Llama-2-7B on an
H100 (Vidur's measured operator profile), chunked prefill of 512 tokens, at most 128 running requests,
round-robin dispatch; 1 and 16 instances. Variants: every step through the scheduler (``--no-collapse``) and
collapsed decode spans, with and without every token's time kept; with tokenyard's prefix cache on (its default)
and off (Vidur's scheduler has none: the same feature set as the peer; hashing and registering every full block
is then not done).

    python benchmarks/bench_sim_speed.py                 # tokenyard's variants; Vidur's from vidur_speed.json
    python benchmarks/bench_sim_speed.py --run-vidur     # rerun Vidur first (benchmarks/vidur/run_vidur.sh)
    python benchmarks/bench_sim_speed.py --instances 1,16,64 --repeats 3
    python benchmarks/bench_sim_speed.py --cprofile      # and where the time goes (top functions)

Every run is a fresh process (as each of Vidur's is: a run after others in one process measured up to 15% slower),
repeated ``--repeats`` times; the table shows the best run and the range, beside Vidur's best.
Writes benchmarks/results/sim/speed.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE / "peers"))
from compare import machine  # noqa: E402

from tokenyard.bench.traces import parse_trace  # noqa: E402
from tokenyard.bench.workload import RequestSpec  # noqa: E402
from tokenyard.sched.scheduler import SchedulerConfig  # noqa: E402
from tokenyard.sim.cost import load_cost_model  # noqa: E402
from tokenyard.sim.simulator import SimConfig, Simulator  # noqa: E402

console = Console(width=140)
TRACE = REPO.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"


def specs_like_vidur(path: Path, n: int, max_tokens: int = 4096) -> list[RequestSpec]:
    rows = parse_trace(path, limit=n).rows
    t0 = rows[0].time_s
    out = []
    for i, r in enumerate(rows):
        decode = min(max(r.generated_tokens, 1), max_tokens - 1)
        prefill = min(max(r.context_tokens, 1), max_tokens - decode)
        out.append(RequestSpec(i, prefill, decode, r.time_s - t0))
    return out


def run_one(specs, instances: int, collapse: bool, tokens: bool, prefix: bool = True, profile: bool = False) -> dict:
    cost = load_cost_model("vidur:h100:llama-2-7b")
    sim = Simulator(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=128), cost,
                    SimConfig(num_instances=instances, dispatch="round-robin", migration=False, max_model_len=4096,
                              collapse=collapse, record_tokens=tokens, enable_prefix_caching=prefix))
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    res = sim.run(specs)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    ok = sum(r.ok for r in res.records)
    out = {"instances": instances, "collapse": collapse, "token_times": tokens, "prefix_caching": prefix,
           "wall_s": wall,
           "requests_per_s": len(specs) / wall, "completed": ok, "steps": res.steps, "span_steps": res.span_steps,
           "simulated_s": res.duration_s}
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        out["top"] = s.getvalue()
    return out


def run_fresh(args, instances: int, collapse: bool, tokens: bool, prefix: bool) -> dict:
    """One variant in a fresh interpreter (nothing left over from the runs before it)."""
    one = json.dumps({"instances": instances, "collapse": collapse, "tokens": tokens, "prefix": prefix})
    out = subprocess.run([sys.executable, __file__, "--trace", args.trace, "--num-requests", str(args.num_requests),
                          "--one", one], check=True, capture_output=True, text=True).stdout
    return json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--num-requests", type=int, default=10_000)
    p.add_argument("--instances", default="1,16,64")
    p.add_argument("--run-vidur", action="store_true", help="rerun Vidur (needs its venv: run_vidur.sh makes it)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant (each a fresh process)")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one variant (JSON) and print its result
    p.add_argument("--out", default=str(HERE / "results" / "sim" / "speed.json"))
    args = p.parse_args(argv)
    if args.one:
        v = json.loads(args.one)
        specs = specs_like_vidur(Path(args.trace), args.num_requests)
        print("RESULT " + json.dumps(run_one(specs, v["instances"], v["collapse"], v["tokens"], v["prefix"])))
        return 0
    vidur_json = HERE / "vidur" / "vidur_speed.json"
    if args.run_vidur:
        subprocess.run(["bash", str(HERE / "vidur" / "run_vidur.sh"), args.trace, str(args.num_requests),
                        args.instances.replace(",", " ")], check=True)
    vidur = {}
    if vidur_json.is_file():
        for r in json.loads(vidur_json.read_text())["runs"]:
            if r["num_requests"] == args.num_requests and "native" not in json.dumps(r.get("note", "")):
                vidur.setdefault(r["num_replicas"], []).append(r["requests_per_s"])
    specs = specs_like_vidur(Path(args.trace), args.num_requests)
    rows = []
    for n in (int(x) for x in args.instances.split(",")):
        for collapse, tokens, prefix in ((False, True, True), (True, True, True), (True, False, True),
                                         (False, True, False), (True, False, False)):
            runs = [run_fresh(args, n, collapse, tokens, prefix) for _ in range(args.repeats)]
            r = min(runs, key=lambda x: x["wall_s"])
            r["runs_wall_s"] = [x["wall_s"] for x in runs]
            r["runs_requests_per_s"] = [x["requests_per_s"] for x in runs]
            console.print(f"{n} instance(s), collapse={collapse}, token times={tokens}, prefix cache={prefix}: "
                          f"{', '.join(f'{x:.2f}' for x in r['runs_wall_s'])} s, best {r['requests_per_s']:.0f} "
                          f"req/s ({r['span_steps']}/{r['steps']} steps in spans)")
            rows.append(r)
        if args.cprofile:
            for prefix in (True, False):
                r = run_one(specs, n, True, False, prefix, profile=True)
                console.print(r["top"])
    table = Table(title=f"requests simulated per wall second, {args.num_requests} requests ({machine()['cpu']}, "
                        f"one core; best of {args.repeats} fresh processes)")
    for c in ("instances", "simulator", "wall s (best)", "req/s (best)", "req/s (all runs)", "vs Vidur (best)"):
        table.add_column(c, justify="right")
    for n in sorted({r["instances"] for r in rows}):
        v = max(vidur.get(n, [0])) or None
        if v:
            table.add_row(str(n), "Vidur 0.0.26", f"{args.num_requests / v:.1f}", f"{v:.0f}",
                          ", ".join(f"{x:.0f}" for x in vidur[n]), "1.00")
        for r in (x for x in rows if x["instances"] == n):
            name = "tokenyard " + ("collapsed" if r["collapse"] else "step by step") + \
                ("" if r["token_times"] else ", no token times") + \
                ("" if r["prefix_caching"] else ", no prefix cache")
            r["vs_vidur"] = r["requests_per_s"] / v if v else None
            table.add_row(str(n), name, f"{r['wall_s']:.2f}", f"{r['requests_per_s']:.0f}",
                          ", ".join(f"{x:.0f}" for x in r["runs_requests_per_s"]),
                          f"{r['vs_vidur']:.1f}" if v else "-")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "num_requests": args.num_requests, "vidur": vidur,
                               "tokenyard": [{k: v for k, v in r.items() if k != "top"} for r in rows]}, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

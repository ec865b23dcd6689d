"""The scheduler's own time per engine step: ``schedule()`` + ``update_from_output()`` with N requests decoding.

On a GPU a decode step of a 7B model takes ~10-30 ms; the scheduler's bookkeeping runs on the host between steps,
so its time per step is overhead the device waits for (unless overlapped). This drives the real ``Scheduler`` and
``KVCacheManager`` (no model) through decode steps at 32 and 256 running requests, every policy, prefix cache off
and on, and reports milliseconds per step (median of repeated timed blocks).

    python benchmarks/bench_scheduler.py                    # writes benchmarks/results/scheduler_step.json
    python benchmarks/bench_scheduler.py --running 64,512 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "peers"))
from compare import machine  # noqa: E402

from tokenyard.kv.manager import KVCacheManager  # noqa: E402
from tokenyard.sched.request import Request  # noqa: E402
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig  # noqa: E402

TOKEN = 5


def _step(s: Scheduler) -> None:
    out = s.schedule()
    s.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample})


def ms_per_step(running: int, policy: str, caching: bool, steps: int, blocks: int = 5) -> float:
    """Median over ``blocks`` timed blocks of ``steps`` decode steps each, after every prompt is in."""
    kv = KVCacheManager(200_000, 16, 0, caching)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=max(2048, running), max_num_seqs=running,
                                  scheduling_policy=policy), kv)
    for i in range(running):   # prompts of 200-249 tokens, tenants t0..t3
        s.add_request(Request(f"r{i}", [1 + (i * 7 + j) % 1000 for j in range(200 + i % 50)], 10**6,
                              tenant=f"t{i % 4}", arrival_time=float(i)))
    while len(s.running) < running or any(r.is_prefilling for r in s.running):
        _step(s)
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(steps):
            _step(s)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--running", default="32,256", help="decoding requests, comma-separated")
    p.add_argument("--policies", default="fcfs,priority,vtc")
    p.add_argument("--steps", type=int, default=100, help="steps per timed block")
    p.add_argument("--out", default=str(HERE / "results" / "scheduler_step.json"))
    args = p.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.running.split(",")):
        for policy in args.policies.split(","):
            for caching in (False, True):
                ms = ms_per_step(n, policy, caching, args.steps)
                rows.append({"running": n, "policy": policy, "prefix_caching": caching, "ms_per_step": ms,
                             "us_per_request": ms * 1e3 / n})
    console = Console(width=120)
    table = Table(title=f"scheduler time per decode step ({machine()['cpu']}, one core)")
    for c in ("running", "policy", "prefix cache", "ms / step", "µs / request"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["running"]), r["policy"], "on" if r["prefix_caching"] else "off",
                      f"{r['ms_per_step']:.3f}", f"{r['us_per_request']:.2f}")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

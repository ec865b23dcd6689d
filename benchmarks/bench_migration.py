"""Live migration cost: downtime vs sequence length, against a blocking copy and a recompute; source slowdown.

Two instances of the bundled SmolLM2 (Ray actors, one torch thread each) behind a ``ClusterEngine``. For each
sequence length L, a request with an L-token prompt decodes on one instance next to a background request; then

- **live**: it migrates with copy stages while it keeps decoding, then a stop-and-copy of the rest. Downtime =
  from the freeze to the commit (what the request stalls);
- **blocking copy**: it migrates back with no stages: every block is copied while it is frozen;
- **recompute**: what a migration without KV would cost: the destination prefills the request's tokens again
  (a fresh request with the same tokens, its own cache salt so nothing is a prefix hit); time to first token.

While the live migration runs, the background request's inter-token gaps on the source are compared with its
gaps just before (the decode slowdown the copy stages cause).

    python benchmarks/bench_migration.py                      # L = 256, 512, 1024, 2048, 4096
    python benchmarks/bench_migration.py --lengths 512,2048 --repeats 5

Writes benchmarks/results/migration.json and prints a table (medians over the repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from compare import machine  # noqa: E402

from tokenyard import SamplingParams  # noqa: E402
from tokenyard.cluster.runtime.frontend import ClusterConfig, ClusterEngine  # noqa: E402
from tokenyard.config import EngineConfig  # noqa: E402

console = Console(width=150)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="256,512,1024,2048,4096", help="sequence lengths (prompt tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    p.add_argument("--out", default=str(HERE / "results" / "migration.json"))
    return p.parse_args(argv)


async def _stream(eng: ClusterEngine, prompt: list[int], max_tokens: int, salt: str | None = None):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    stream = await eng.add_request(prompt, params, cache_salt=salt)
    return stream


async def one(eng: ClusterEngine, length: int, rng: random.Random) -> dict:
    vocab = eng.model_config.vocab_size
    bg_prompt = [rng.randrange(100, vocab) for _ in range(64)]
    prompt = [rng.randrange(100, vocab) for _ in range(length)]
    bg = await _stream(eng, bg_prompt, 100_000 // 100)
    bg_times: list[float] = []

    async def consume_bg():
        async for o in bg:
            bg_times.extend([time.perf_counter()] * len(o.token_ids))

    bg_task = asyncio.create_task(consume_bg())
    req = await _stream(eng, prompt, 4000)
    req_times: list[float] = []

    async def consume_req():
        async for o in req:
            req_times.extend([time.perf_counter()] * len(o.token_ids))

    req_task = asyncio.create_task(consume_req())
    while len(req_times) < 8:
        await asyncio.sleep(0.005)
    src = eng._reqs[req.request_id].instance
    dst = next(i for i in eng._instances if i != src)
    # Move the background request to the source, so the live migration's stages run beside its decode.
    if eng._reqs[bg.request_id].instance != src:
        await asyncio.to_thread(eng.migrate_request, bg.request_id, src)
    await asyncio.sleep(1.0)
    t_live = time.perf_counter()
    live = await asyncio.to_thread(eng.migrate_request, req.request_id, dst)
    t_live_end = time.perf_counter()
    await asyncio.sleep(1.0)
    t_block = time.perf_counter()
    blocking = await asyncio.to_thread(eng.migrate_request, req.request_id, src, None, None, 0)
    t_block_end = time.perf_counter()
    await asyncio.sleep(1.0)
    # Recompute: the same tokens prefilled afresh on the destination (no prefix hit: its own salt).
    tokens = prompt + eng._outputs.output(req.request_id).token_ids
    req.abort()
    await asyncio.gather(req_task, return_exceptions=True)
    t0 = time.perf_counter()
    rec = await _stream(eng, tokens, 1, salt=f"recompute-{rng.random()}")
    async for _ in rec:
        break
    recompute_s = time.perf_counter() - t0
    async for _ in rec:
        pass
    bg.abort()
    await asyncio.gather(bg_task, return_exceptions=True)
    assert live is not None and live.committed and blocking is not None and blocking.committed, (live, blocking)
    step = _median_gap(req_times, t_live - 1.0, t_live)
    return {
        "length": len(tokens), "blocks": live.blocks_staged + live.blocks_final,
        "live_downtime_ms": live.downtime_s * 1e3, "live_total_ms": live.total_s * 1e3, "live_stages": live.stages,
        "live_blocks_final": live.blocks_final, "blocking_downtime_ms": blocking.downtime_s * 1e3,
        "recompute_ms": recompute_s * 1e3,
        # What the client sees: the request's longest inter-token gap around each migration, less its usual gap.
        "req_gap_ms": step * 1e3,
        "live_stall_ms": (_max_gap(req_times, t_live, t_live_end) - step) * 1e3,
        "blocking_stall_ms": (_max_gap(req_times, t_block, t_block_end) - step) * 1e3,
        "src_gap_before_ms": _median_gap(bg_times, t_live - 1.0, t_live) * 1e3,
        "src_gap_during_ms": _median_gap(bg_times, t_live, t_live_end) * 1e3,
    }


def _gaps(times: list[float], lo: float, hi: float) -> list[float]:
    """Gaps between consecutive tokens whose later token came in [lo, hi + one more token]."""
    out = []
    for a, b in zip(times, times[1:]):
        if b >= lo and a <= hi:
            out.append(b - a)
    return out


def _median_gap(times: list[float], lo: float, hi: float) -> float:
    g = [x for x in _gaps(times, lo, hi) if x > 0]
    return statistics.median(g) if g else float("nan")


def _max_gap(times: list[float], lo: float, hi: float) -> float:
    return max(_gaps(times, lo, hi), default=float("nan"))


async def run(args: argparse.Namespace) -> list[dict]:
    lengths = [int(x) for x in args.lengths.split(",")]
    eng = ClusterEngine(EngineConfig(num_kv_blocks=2048, max_model_len=8192),
                        ClusterConfig(num_instances=2, dispatch="round-robin", migration=False,
                                      instance_threads=args.threads))
    console.print("starting 2 instances of the bundled model ...")
    eng.start()
    rng = random.Random(0)
    rows = []
    try:
        await one(eng, 128, rng)   # warm-up: first calls, first copies
        for length in lengths:
            for _ in range(args.repeats):
                r = await one(eng, length, rng)
                console.print(r)
                rows.append(r)
    finally:
        eng.close()
    return rows


def median_by_length(rows: list[dict]) -> list[dict]:
    out = []
    for length in sorted({r["length"] // 64 * 64 for r in rows}):
        group = [r for r in rows if r["length"] // 64 * 64 == length]
        med = {k: statistics.median([g[k] for g in group if g[k] is not None] or [float("nan")])
               for k in group[0] if k != "length"}
        out.append({"length": length, **med, "repeats": len(group)})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(run(args))
    table = Table(title="live migration vs blocking copy vs recompute (medians)")
    for col in ("tokens", "blocks", "step ms", "live downtime ms", "live stall ms", "live total ms",
                "blocking downtime ms", "blocking stall ms", "recompute ms", "src gap before ms", "src gap during ms"):
        table.add_column(col, justify="right")
    summary = median_by_length(rows)
    for s in summary:
        table.add_row(str(s["length"]), f"{s['blocks']:.0f}", f"{s['req_gap_ms']:.0f}",
                      f"{s['live_downtime_ms']:.0f}", f"{s['live_stall_ms']:.0f}", f"{s['live_total_ms']:.0f}",
                      f"{s['blocking_downtime_ms']:.0f}", f"{s['blocking_stall_ms']:.0f}", f"{s['recompute_ms']:.0f}",
                      f"{s['src_gap_before_ms']:.1f}", f"{s['src_gap_during_ms']:.1f}")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "summary": summary, "runs": rows},
                              indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

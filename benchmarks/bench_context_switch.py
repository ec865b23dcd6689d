"""Context switches: what preemption costs under recompute, per-block synchronous swap, and FastSwitch's
block groups + overlapped swaps + host reuse, on the same engine, workload and KV pool.

Two parts, run one after the other (never two servers at once):

1. Copy throughput per segment size, in process: 64 blocks of the bundled SmolLM2's KV (device -> host and
   back) copied as segments of 1, 2, 4, ... 64 blocks through the engine's own ``KVStore``, beside the
   layer-major gather the engine used before (``k[:, ids]`` per tensor: what a per-block swap did).
2. Serving, for each variant: ``tokenyard serve --scheduling-policy priority --num-kv-blocks N`` with a pool
   small enough to force preemption, and ``tokenyard bench serve`` sending multi-turn chats (4 turns) whose
   in-flight requests all get new priorities every ``--churn`` seconds (``--priority-churn``, through
   ``POST /v1/requests/{id}/priority``). From the bench JSON: P95/P99 TTFT, P99/P99.9 TBT (inter-token gaps),
   output tok/s; from the server's /metrics: preemptions, swap copies and bytes, host prefix hits.

    python benchmarks/bench_context_switch.py
    python benchmarks/bench_context_switch.py --variants recompute,swap-sync,fastswitch --num-prompts 64

Writes benchmarks/results/context_switch.json and .png, and each run's bench JSON and server log under
benchmarks/results/context_switch/.
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
REPO = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))
from bench_fairness import run_bench_serve, started  # noqa: E402
from compare import Peer, free_port, machine  # noqa: E402

console = Console(width=150)

VARIANTS = {
    "recompute": ["--preemption-mode", "recompute"],
    "swap-sync": ["--preemption-mode", "swap", "--swap-overlap", "off", "--no-swap-block-groups",
                  "--no-host-prefix-cache"],
    "fastswitch": ["--preemption-mode", "swap", "--swap-overlap", "on"],
    # ablations: one FastSwitch idea off at a time (no-overlap is what `--preemption-mode swap` does on CPU)
    "no-overlap": ["--preemption-mode", "swap", "--swap-overlap", "off"],
    "no-groups": ["--preemption-mode", "swap", "--swap-overlap", "on", "--no-swap-block-groups"],
    "no-reuse": ["--preemption-mode", "swap", "--swap-overlap", "on", "--no-host-prefix-cache"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default="recompute,swap-sync,no-overlap,fastswitch",
                   help=f"comma-separated, run in turn: {', '.join(VARIANTS)}")
    p.add_argument("--num-prompts", type=int, default=64, help="requests (16 conversations of 4 turns)")
    p.add_argument("--multi-turn", type=int, default=4)
    p.add_argument("--request-rate", type=float, default=1.0, help="conversations' first turns per second")
    p.add_argument("--input-len", default="32:128")
    p.add_argument("--output-len", default="32:64")
    p.add_argument("--priorities", default="0,1,2,3")
    p.add_argument("--churn", type=float, default=0.75, help="seconds between priority changes (~25 steps here)")
    p.add_argument("--num-kv-blocks", type=int, default=80, help="device KV blocks of 16 tokens (forces preemption)")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--server-args", default="--max-num-seqs 16", help="more `tokenyard serve` flags (all runs)")
    p.add_argument("--copy-blocks", type=int, default=64, help="blocks per copy-throughput measurement")
    p.add_argument("--copy-repeats", type=int, default=20)
    p.add_argument("--skip-copy", action="store_true", help="skip the copy-throughput part")
    p.add_argument("--copy-device", default="cpu", help="where the device KV lives for the copy part (cpu, cuda)")
    p.add_argument("--model", default=None, help="HF directory to serve (default: the bundled SmolLM2); its "
                   "tokenizer builds the prompts")
    p.add_argument("--dtype", default="float32", help="the server's --dtype (and the copy part's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench-timeout", type=float, default=1800.0)
    p.add_argument("--out", default=str(HERE / "results" / "context_switch.json"))
    return p.parse_args(argv)


def model_config(model: str | None):
    from tokenyard.model.config import ModelConfig
    from tokenyard.model.loader import read_hf_config, resolve_model

    return ModelConfig.from_hf(read_hf_config(resolve_model(model).hf_dir))


def kv_block_bytes(model: str | None, dtype: str, block_size: int = 16) -> int:
    import torch

    from tokenyard.engine.kv_store import KVStore

    return KVStore.bytes_per_block(model_config(model), block_size, getattr(torch, dtype))


# --------------------------------------------------------------------------- part 1: copy throughput
def copy_throughput(n_blocks: int, repeats: int, device: str = "cpu", model: str | None = None,
                    dtype: str = "float32") -> dict:
    import torch

    from tokenyard.engine.kv_store import KVStore

    cfg = model_config(model)
    dev = torch.device(device)
    store = KVStore(cfg, num_blocks=2 * n_blocks, num_host_blocks=2 * n_blocks, block_size=16,
                    device=dev, dtype=getattr(torch, dtype))
    store.kv.normal_()
    nbytes = n_blocks * store.block_bytes
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        fn()
        sync()
        best = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            best.append(time.perf_counter() - t0)
        return float(np.median(best))

    out = {"device": device, "block_bytes": store.block_bytes, "blocks": n_blocks, "segments": {}}
    nb = dev.type == "cuda"   # pinned host memory: asynchronous copies, as the swap worker issues them
    for seg in [1, 2, 4, 8, 16, 32, 64]:
        if seg > n_blocks:
            break
        # Scattered segments (every other run), so that nothing but the segment size is contiguous.
        segs = [(2 * i * seg % (2 * n_blocks), i * seg, seg) for i in range(n_blocks // seg)]
        t_out = timed(lambda s=segs: store.copy(s, to_host=True, non_blocking=nb))
        t_in = timed(lambda s=segs: store.copy([(d, s_, n) for s_, d, n in s], to_host=False, non_blocking=nb))
        out["segments"][seg] = {"copies": len(segs), "out_gbps": nbytes / t_out / 1e9, "in_gbps": nbytes / t_in / 1e9}
    # The layer-major per-block gather the engine used before block groups (two tensors, index copies).
    shape = (cfg.num_layers, 2 * n_blocks, 16, cfg.num_kv_heads, cfg.head_dim)
    k, v = (torch.randn(shape, device=dev, dtype=store.kv.dtype) for _ in range(2))
    kh, vh = torch.zeros(shape, dtype=store.kv.dtype), torch.zeros(shape, dtype=store.kv.dtype)
    src = torch.arange(0, 2 * n_blocks, 2, device=dev)
    dst = torch.arange(n_blocks)

    def gather() -> None:
        kh[:, dst] = k[:, src].to("cpu")
        vh[:, dst] = v[:, src].to("cpu")

    t = timed(gather)
    out["layer_major_gather_gbps"] = nbytes / t / 1e9
    return out


# --------------------------------------------------------------------------- part 2: serving
def run_variant(args: argparse.Namespace, name: str, outdir: Path) -> dict:
    cmd = [sys.executable, "-m", "tokenyard.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
           "--num-threads", str(args.threads), "--no-access-log", "--scheduling-policy", "priority",
           "--num-kv-blocks", str(args.num_kv_blocks), "--dtype", args.dtype, *VARIANTS[name],
           *(["--model", args.model] if args.model else []), *shlex.split(args.server_args)]
    with started(name, Peer(f"tokenyard-{name}", cmd, "/health"), outdir / f"{name}.server.log") as (server, ready):
        t0 = time.monotonic()
        report, metrics = run_bench_serve(server.url, [
            "--num-prompts", str(args.num_prompts), "--multi-turn", str(args.multi_turn),
            "--request-rate", str(args.request_rate), "--input-len", args.input_len, "--output-len", args.output_len,
            "--priorities", args.priorities, "--priority-churn", str(args.churn), "--seed", str(args.seed),
            "--label", name, *(["--tokenizer", args.model] if args.model else []),
        ], outdir / f"{name}.json", outdir / f"{name}.bench.log", args.bench_timeout)
        report["server_metrics"] = {k: v for k, v in metrics.items() if k.startswith("tokenyard_") and "{" not in k}
        report["block_bytes"] = args.block_bytes
        report["ready_s"] = ready
        report["wall_s"] = time.monotonic() - t0
        return report


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


def summarize(report: dict) -> dict:
    reqs = [r for r in report["requests"] if r["ok"]]
    ttft = [r["ttft_s"] for r in reqs if r["ttft_s"] is not None]
    tbt = [g for r in reqs for g in r["itl_s"]]
    m = report["server_metrics"]
    swapped_out = m.get("tokenyard_swap_out_bytes_total", 0.0)
    preempt = m.get("tokenyard_preemptions_total", 0.0)
    s = report["summary"]
    return {
        "completed": s["completed"], "failed": s["failed"], "duration_s": s["duration_s"],
        "output_throughput": s["output_throughput"],
        "ttft_p95_ms": pct(ttft, 95), "ttft_p99_ms": pct(ttft, 99),
        "tbt_p99_ms": pct(tbt, 99), "tbt_p999_ms": pct(tbt, 99.9), "tbt_median_ms": pct(tbt, 50),
        "preemptions": preempt,
        "swap_copies": m.get("tokenyard_swap_copies_total", 0.0),
        "swap_out_bytes": swapped_out, "swap_in_bytes": m.get("tokenyard_swap_in_bytes_total", 0.0),
        "swap_out_reused_blocks": m.get("tokenyard_swap_out_reused_blocks_total", 0.0),
        "host_prefix_hit_tokens": m.get("tokenyard_host_prefix_hit_tokens_total", 0.0),
        "prefix_hit_tokens": m.get("tokenyard_prefix_cache_hit_tokens_total", 0.0),
        "copies_per_preemption": (m.get("tokenyard_swap_copies_total", 0.0) / preempt) if preempt else None,
        "blocks_per_copy": ((swapped_out + m.get("tokenyard_swap_in_bytes_total", 0.0)) / report["block_bytes"]
                            / m["tokenyard_swap_copies_total"]) if m.get("tokenyard_swap_copies_total") else None,
        "mb_out_per_preemption": (swapped_out / preempt / 1e6) if preempt else None,
    }


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_tables(copy: dict | None, summaries: dict[str, dict]) -> None:
    if copy:
        t = Table(title=f"KV copy throughput, {copy['blocks']} blocks of {copy['block_bytes'] / 1e6:.2f} MB "
                        f"(SmolLM2-135M, 16 tokens), GB/s")
        t.add_column("segment (blocks)")
        t.add_column("copies")
        t.add_column("device->host")
        t.add_column("host->device")
        for seg, r in copy["segments"].items():
            t.add_row(str(seg), str(r["copies"]), fmt(r["out_gbps"], 2), fmt(r["in_gbps"], 2))
        t.add_row("layer-major gather (before)", "2 x layers", fmt(copy["layer_major_gather_gbps"], 2), "")
        console.print(t)
    t = Table(title="Context switches under priority churn (multi-turn chats, small KV pool)")
    cols = [("variant", None), ("TTFT P95 ms", "ttft_p95_ms"), ("TTFT P99 ms", "ttft_p99_ms"),
            ("TBT P99 ms", "tbt_p99_ms"), ("TBT P99.9 ms", "tbt_p999_ms"), ("out tok/s", "output_throughput"),
            ("preempt", "preemptions"), ("copies/preempt", "copies_per_preemption"),
            ("MB out/preempt", "mb_out_per_preemption"), ("blocks/copy", "blocks_per_copy"),
            ("host hit tok", "host_prefix_hit_tokens"),
            ("reused blk", "swap_out_reused_blocks"), ("failed", "failed")]
    for c, _ in cols:
        t.add_column(c)
    for name, s in summaries.items():
        t.add_row(name, *(fmt(s[k], 0 if k in ("preemptions", "host_prefix_hit_tokens", "failed",
                                                 "swap_out_reused_blocks") else 1) for _, k in cols[1:]))
    console.print(t)


def plot(path: Path, copy: dict | None, reports: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if copy else 2, figsize=(16 if copy else 11, 4.2))
    for name, rep in reports.items():
        ok = [r for r in rep["requests"] if r["ok"]]
        ttft = np.sort([r["ttft_s"] * 1000 for r in ok if r["ttft_s"] is not None])
        tbt = np.sort([g * 1000 for r in ok for g in r["itl_s"]])
        axes[0].plot(ttft, np.linspace(0, 1, len(ttft)), label=name)
        axes[1].plot(tbt, np.linspace(0, 1, len(tbt)), label=name)
    axes[0].set(xlabel="TTFT (ms)", ylabel="CDF", xscale="log", title="TTFT")
    axes[1].set(xlabel="inter-token gap (ms)", ylabel="CDF", xscale="log", title="TBT", ylim=(0.9, 1.0005))
    axes[0].legend()
    if copy:
        segs = list(copy["segments"])
        axes[2].plot(segs, [copy["segments"][s]["out_gbps"] for s in segs], "o-", label="device->host")
        axes[2].plot(segs, [copy["segments"][s]["in_gbps"] for s in segs], "o-", label="host->device")
        axes[2].axhline(copy["layer_major_gather_gbps"], ls="--", c="gray", label="layer-major gather (before)")
        axes[2].set(xlabel="segment size (blocks)", ylabel="GB/s", xscale="log", title="copy throughput")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        console.print(f"unknown variants: {unknown}; choose from {list(VARIANTS)}")
        return 2
    out = Path(args.out)
    outdir = out.with_suffix("")
    outdir.mkdir(parents=True, exist_ok=True)
    args.block_bytes = kv_block_bytes(args.model, args.dtype)
    copy = None
    if not args.skip_copy:
        console.print("[bold]copy throughput[/bold] (in process)")
        copy = copy_throughput(args.copy_blocks, args.copy_repeats, args.copy_device, args.model, args.dtype)
    reports = {name: run_variant(args, name, outdir) for name in names}
    summaries = {name: summarize(r) for name, r in reports.items()}
    print_tables(copy, summaries)
    ratios = {}
    base = summaries.get("swap-sync")
    if base:
        for name, s in summaries.items():
            ratios[name] = {k: (base[k] / s[k]) if base[k] and s[k] else None
                            for k in ("ttft_p95_ms", "ttft_p99_ms", "tbt_p99_ms", "tbt_p999_ms")}
            ratios[name]["throughput"] = (s["output_throughput"] / base["output_throughput"]
                                          if base["output_throughput"] else None)
        console.print("swap-sync / variant (>1: the variant is better; throughput: variant / swap-sync):")
        for name, r in ratios.items():
            console.print(f"  {name:12s} " + "  ".join(f"{k} {fmt(v, 2)}" for k, v in r.items()))
    result = {"machine": machine(), "args": vars(args), "copy_throughput": copy, "summaries": summaries,
              "ratios_vs_swap_sync": ratios,
              "server_commands": {n: VARIANTS[n] for n in names}}
    out.write_text(json.dumps(result, indent=2))
    plot(out.with_suffix(".png"), copy, reports)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

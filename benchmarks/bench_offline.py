"""Offline throughput and single-stream decode: tokenyard vs transformers ``generate``, side by side.

Same model file (the bundled SmolLM2 GGUF, dequantized to fp32 once; transformers loads that very
directory), same prompts, same output lengths (EOS ignored), fp32, the same torch thread count.

    python benchmarks/bench_offline.py                       # 64 requests, prompts 64-512, outputs 128
    python benchmarks/bench_offline.py --num-requests 16 --output-len 32 --skip-hf   # quick look

Prints a table and writes JSON (default benchmarks/results/offline.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import tokenyard  # noqa: F401  (before torch: it sets OMP_WAIT_POLICY; see tokenyard/__init__.py)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import StaticBatchGenerator, tokenyard_single_stream  # noqa: E402


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def throughput(n_out: int, elapsed: float, prompts: list[list[int]], **extra) -> dict:
    return {
        "elapsed_s": elapsed,
        "output_tokens": n_out,
        "output_tok_s": n_out / elapsed,
        "total_tok_s": (n_out + sum(map(len, prompts))) / elapsed,
        **extra,
    }


# ----------------------------------------------------------------------------- tokenyard
def run_tokenyard(args, prompts, single_prompt) -> dict:
    from tokenyard import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.max_num_seqs, kv_cache_memory_gb=args.kv_cache_gb)
    load_s = time.perf_counter() - t0
    engine = llm.engine
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    # Warm-up so first-call allocations are not charged to either measurement.
    llm.generate([single_prompt[:32]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))

    # Single stream: time every step of one request.
    single = tokenyard_single_stream(engine, single_prompt, params)

    # Offline throughput, with a per-step time breakdown.
    step_times = []
    for p in prompts:
        engine.add_request(p, params)
    t_start = time.perf_counter()
    n_out = 0
    while engine.has_unfinished_requests():
        s = time.perf_counter()
        n_out += len(engine.step())
        step_times.append(time.perf_counter() - s)
    elapsed = time.perf_counter() - t_start
    return {
        "load_s": load_s,
        "single": single,
        "throughput": throughput(n_out, elapsed, prompts, steps=len(step_times),
                                 median_step_ms=1000 * statistics.median(step_times),
                                 preemptions=engine.scheduler.num_preemptions),
    }


# ----------------------------------------------------------------------------- transformers
def run_transformers(args, prompts, single_prompt, hf_dir) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    hf = StaticBatchGenerator(model)
    single = hf.single_stream(single_prompt, args.output_len)

    t = time.perf_counter()
    n_out = 0
    for i in range(0, len(prompts), args.hf_batch_size):
        n_out += sum(map(len, hf.generate(prompts[i:i + args.hf_batch_size], args.output_len)))
    elapsed = time.perf_counter() - t
    return {
        "load_s": load_s,
        "single": single,
        "throughput": throughput(n_out, elapsed, prompts, batch_size=args.hf_batch_size),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir or .gguf (default: bundled SmolLM2)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-input-len", type=int, default=64)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--single-input-len", type=int, default=128)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--result-json", default="benchmarks/results/offline.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from tokenyard.model.config import ModelConfig
    from tokenyard.model.loader import ensure_hf_weights, read_hf_config, resolve_model

    hf_dir = resolve_model(args.model).hf_dir
    ensure_hf_weights(hf_dir)
    vocab = ModelConfig.from_hf(read_hf_config(hf_dir)).vocab_size
    prompts = make_prompts(args.num_requests, args.min_input_len, args.max_input_len, vocab, args.seed)
    single_prompt = make_prompts(1, args.single_input_len, args.single_input_len, vocab, args.seed + 1)[0]

    results = {"tokenyard": run_tokenyard(args, prompts, single_prompt)}
    if not args.skip_hf:
        results["transformers"] = run_transformers(args, prompts, single_prompt, hf_dir)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"offline: {args.num_requests} requests, prompts {args.min_input_len}-{args.max_input_len}, "
                        f"outputs {args.output_len}, fp32, {args.threads} threads")
    for col in ("system", "gen tok/s", "total tok/s", "elapsed s", "1-stream decode tok/s", "1-stream TTFT ms"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['throughput']['output_tok_s']:.1f}", f"{r['throughput']['total_tok_s']:.1f}",
                      f"{r['throughput']['elapsed_s']:.1f}", f"{r['single']['decode_tok_s']:.1f}",
                      f"{1000 * r['single']['ttft_s']:.0f}")
    console = Console()
    console.print(table)
    if "transformers" in results:
        ty, hf = results["tokenyard"], results["transformers"]
        ratios = {
            "throughput": ty["throughput"]["output_tok_s"] / hf["throughput"]["output_tok_s"],
            "single_stream_decode": ty["single"]["decode_tok_s"] / hf["single"]["decode_tok_s"],
        }
        results["ratios_tokenyard_over_transformers"] = ratios
        console.print(f"tokenyard / transformers: throughput {ratios['throughput']:.2f}x, "
                      f"single-stream decode {ratios['single_stream_decode']:.2f}x")
    results["config"] = vars(args) | {"machine": platform.processor() or platform.machine(),
                                      "torch": torch.__version__}
    out = Path(args.result_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()

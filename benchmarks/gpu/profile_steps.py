"""Where a step's GPU time goes, for the CUDA issue: the top kernels (torch profiler) of one prefill step, one
mixed step and one decode graph replay of the random ~1B Llama, and timings of the parts in isolation.

    python benchmarks/gpu/profile_steps.py          # on a CUDA machine; prints tables, writes $OUT/profile.txt
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1000


def parts(engine, log) -> None:
    """The pieces of a step alone, on the engine's own cache views: cache writes, prefill attention, decode
    attention."""
    runner = engine.runner
    kc, vc = runner.k_cache[:, 0], runner.v_cache[:, 0]
    bs, kvh, d = kc.shape[1], kc.shape[2], kc.shape[3]
    heads = engine.model_config.num_heads
    dev, dt = kc.device, kc.dtype
    layers = runner.store.kv.shape[1]
    flat = runner.store.kv.view(-1, kvh, d)
    for t in (256, 4096):
        slots = torch.randperm(1000 * bs, device=dev)[:t]
        k = torch.randn(t, kvh, d, device=dev, dtype=dt)
        at = (slots // bs, slots % bs)
        rows = (slots // bs) * (layers * 2 * bs) + slots % bs
        put = timed(lambda at=at, k=k: kc.index_put_(at, k))
        copy = timed(lambda rows=rows, k=k: flat.index_copy_(0, rows, k))
        log(f"cache write of {t} rows, one layer: index_put_ on the strided view {put:.3f} ms, "
            f"index_copy_ on the flat view {copy:.3f} ms")
    sdpa = F.scaled_dot_product_attention
    for n in (512, 1024):
        q = torch.randn(1, heads, n, d, device=dev, dtype=dt)
        kk = torch.randn(1, kvh, n, d, device=dev, dtype=dt)
        rep = kk.repeat_interleave(heads // kvh, 1)
        kk2 = torch.randn(1, kvh, 2 * n, d, device=dev, dtype=dt)
        mask = torch.ones(n, 2 * n, device=dev, dtype=torch.bool).tril(n)
        gqa = timed(lambda q=q, kk=kk: sdpa(q, kk, kk, is_causal=True, enable_gqa=True))
        repeated = timed(lambda q=q, rep=rep: sdpa(q, rep, rep, is_causal=True))
        masked = timed(lambda q=q, kk2=kk2, mask=mask: sdpa(q, kk2, kk2, attn_mask=mask, enable_gqa=True))
        log(f"SDPA n={n}: causal GQA {gqa:.3f} ms, causal with KV repeated {repeated:.3f} ms, "
            f"masked GQA against {2 * n} keys {masked:.3f} ms")
    from tokenyard.model.triton_attention import paged_decode_attention

    n, ctx = 256, 700
    tables = torch.randint(0, kc.shape[0] - 1, (n, -(-ctx // bs)), device=dev)
    lens = torch.full((n,), ctx, device=dev)
    q = torch.randn(n, heads, d, device=dev, dtype=dt)
    ms = timed(lambda: paged_decode_attention(q, kc, vc, tables, lens, d ** -0.5))
    gb = 2 * n * ctx * kvh * d * kc.element_size() / 1e9
    log(f"Triton decode attention, {n} seqs x {ctx} keys, one layer: {ms:.3f} ms ({gb / ms * 1000:.0f} GB/s)")


def profile(fn, log, title: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    log(f"== {title}")
    log(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/tokenyard-bench-gpu-model/1b")
    args = ap.parse_args()
    if not (Path(args.model_dir) / "config.json").exists():
        from bench_gpu import build_model_dir

        build_model_dir(argparse.Namespace(preset="1b", max_model_len=2048, seed=0, dtype="bfloat16",
                                           device="cuda"), Path(args.model_dir))
    out = Path(os.environ.get("OUT", "benchmarks/results/gpu"))
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    from tokenyard import LLM, SamplingParams

    llm = LLM(model=args.model_dir, dtype="bfloat16", device="cuda", max_model_len=2048, max_num_seqs=256,
              max_num_batched_tokens=4096, gpu_memory_utilization=0.5)
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    llm.generate([[rng.randrange(3, 32000) for _ in range(64)] for _ in range(4)], params)   # warm-up
    try:
        parts(engine, log)
    except Exception as e:  # noqa: BLE001
        log(f"parts failed: {e!r}")
    for _ in range(4):
        engine.add_request([rng.randrange(3, 32000) for _ in range(1024)], params)
    profile(engine.step, log, "prefill step: 4 prompts x 1024 tokens")
    for _ in range(2):
        engine.add_request([rng.randrange(3, 32000) for _ in range(1000)], params)
    profile(engine.step, log, "mixed step: 4 decodes + 2 prompts x 1000")
    while engine.has_unfinished_requests():
        engine.step()
    for _ in range(256):
        engine.add_request([rng.randrange(3, 32000) for _ in range(128)], params)
    for _ in range(12):   # 32k prompt tokens at 4096 a step, then decodes only
        engine.step()
    profile(engine.step, log, "decode step: 256 requests (graph replay)")
    (out / "profile.txt").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

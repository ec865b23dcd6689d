"""What ``--quantization`` costs and buys on CPU, in process, on the bundled SmolLM2 GGUF (Q4_1, embedding Q8_0).

For each setting (``none``: fp32, dequantized once; ``auto``: the GGUF's own blocks; ``int8``: q8_0 everywhere):
- accuracy: mean log-probability (and perplexity) of a fixed English text, teacher-forced in one prefill; greedy
  agreement with fp32 over the first 32 tokens of 8 prompts;
- speed: single-stream decode tok/s (one request, 128 tokens) and offline throughput (32 requests, prompts
  64-256, 64 output tokens each, all at once), so batched steps are measured too;
- memory: bytes of the linear weights and the embedding.

    python benchmarks/bench_quant.py                 # table + benchmarks/results/quant.json

Serving comparisons against llama.cpp and transformers are ``benchmarks/peers/compare.py``'s (see README).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import tokenyard  # noqa: F401  (before torch: it sets OMP_WAIT_POLICY; see tokenyard/__init__.py)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import tokenyard_single_stream  # noqa: E402

TEXT = (
    "The river ran low that summer, and the town learned to live with less of it. Farmers watered at night, "
    "when the air was cool and the water did not vanish before it reached the roots. The mill, which had turned "
    "for a hundred years, stood still for the first time anyone could remember, and children climbed on its "
    "wheel as if it were a toy left out for them. Nobody blamed the river. It had given what it could, and the "
    "old people said it would come back, as it always had, when the snow in the mountains was deep again. In "
    "the evenings the whole town walked down to the bank to look at the stones that had been under water all "
    "their lives, smooth and pale, and the talk was of other dry years and how each of them had ended."
)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:",
           "The best way to learn a language is", "import numpy as np\n", "Water boils at", "My favourite season"]


def mean_logprob(llm, ids: list[int]) -> float:
    """Teacher-forced mean log-probability of ids[1:] given what precedes, from one forward pass."""
    from tokenyard.model.llama import AttentionMetadata

    runner = llm.engine.runner
    n = len(ids)
    # Slots 0..n-1 of the device cache: the engine is idle, nothing else lives there.
    meta = AttentionMetadata.whole_prompt(torch.arange(n))
    logits = runner.model.forward(torch.tensor(ids), torch.arange(n), meta, runner.k_cache, runner.v_cache,
                                  torch.arange(n - 1))
    lp = torch.log_softmax(logits.float(), dim=-1)
    return float(lp[torch.arange(n - 1), torch.tensor(ids[1:])].mean())


def weight_bytes(llm) -> int:
    from tokenyard.model.quant import QuantWeight

    w = llm.engine.runner.model.w
    tensors = [t for lw in w.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [w.embed]
    if w.lm_head is not w.embed:
        tensors.append(w.lm_head)
    return sum(t.nbytes if isinstance(t, QuantWeight) else t.numel() * t.element_size() for t in tensors)


def run(setting: str, args, reference: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
    from tokenyard import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(quantization=setting, max_num_batched_tokens=512, kv_cache_memory_gb=0.5)
    load_s = time.perf_counter() - t0
    engine = llm.engine
    ids = llm.tokenizer.encode(TEXT)
    lp = mean_logprob(llm, ids)
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
    agree = None
    if reference is not None:
        same = sum(a == b for o, r in zip(outs, reference) for a, b in zip(o, r))
        agree = {"tokens": same, "of": 32 * len(PROMPTS), "share": same / (32 * len(PROMPTS)),
                 "first_tokens_same": sum(o[0] == r[0] for o, r in zip(outs, reference))}
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    singles = [tokenyard_single_stream(engine, ids[:128], params) for _ in range(args.repeats)]
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    batch = [[rng.randrange(100, vocab - 1) for _ in range(rng.randint(64, 256))] for _ in range(32)]
    bparams = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    n_out = sum(len(o.token_ids) for o in llm.generate(batch, bparams))
    elapsed = time.perf_counter() - t
    return {
        "load_s": load_s,
        "weight_mb": weight_bytes(llm) / 1e6,
        "mean_logprob": lp, "perplexity": float(torch.tensor(-lp).exp()), "text_tokens": len(ids),
        "greedy_agreement_vs_fp32": agree,
        "single_stream": {"decode_tok_s": max(s["decode_tok_s"] for s in singles),
                          "decode_tok_s_runs": [s["decode_tok_s"] for s in singles],
                          "ttft_ms": min(s["ttft_s"] for s in singles) * 1000},
        "batch32": {"output_tok_s": n_out / elapsed, "elapsed_s": elapsed},
    }, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="none,auto,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="single-stream runs (the best is reported)")
    ap.add_argument("--out", default="benchmarks/results/quant.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tokenyard.model.paged_attention import load_kernel

    results: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                     "kernel_isa": load_kernel().quant_isa(), "torch": torch.__version__, "settings": {}}
    reference = None
    for setting in args.settings.split(","):
        res, outs = run(setting, args, reference)
        if setting == "none":
            reference = outs
        results["settings"][setting] = res
        print(setting, json.dumps(res), flush=True)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"--quantization on the bundled SmolLM2 GGUF ({results['kernel_isa']}, {args.threads} threads)")
    for col in ("setting", "weights MB", "mean logprob", "ppl", "agree w/ fp32", "1-stream tok/s", "TTFT ms",
                "32 requests out tok/s"):
        table.add_column(col, justify="right")
    for name, r in results["settings"].items():
        a = r["greedy_agreement_vs_fp32"]
        table.add_row(name, f"{r['weight_mb']:.0f}", f"{r['mean_logprob']:.4f}", f"{r['perplexity']:.3f}",
                      "-" if a is None else f"{a['share']:.1%} (first {a['first_tokens_same']}/{len(PROMPTS)})",
                      f"{r['single_stream']['decode_tok_s']:.1f}", f"{r['single_stream']['ttft_ms']:.0f}",
                      f"{r['batch32']['output_tok_s']:.1f}")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

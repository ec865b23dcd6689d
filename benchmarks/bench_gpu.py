"""tokenyard vs transformers ``generate`` on one GPU: offline throughput, single stream, TTFT, and where a step's
time goes (what the GPU computes vs what Python does around it).

The model is a random-weight Llama built here from a config (no download): by default the CUDA issue's ~1B
model (hidden 2048, 16 layers, 32/8 heads, vocab 32000), in bf16, saved once as a Hugging Face directory that
both systems load. Same prompts (token ids), same output length (EOS ignored) for both; transformers runs
static batches (left-padded), as a user of ``generate`` would.

    python benchmarks/bench_gpu.py                                  # the issue's comparison (CUDA)
    python benchmarks/bench_gpu.py --preset tiny --device cpu --dtype float32 --num-requests 8 \\
        --output-len 16 --input-len 8:32 --single-input-len 16 --hf-batch-size 4     # a smoke run on CPU

Also checks bf16 agreement on this model: transformers reads each of the first requests' prompt followed by
tokenyard's output and picks its greedy token at each of the first 32 positions (teacher forcing).
Prints a table and writes JSON (default benchmarks/results/gpu.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import StaticBatchGenerator, tokenyard_single_stream  # noqa: E402

PRESETS = {
    # ~1.1B parameters: the shape of Llama-3.2-1B with a 32k vocabulary (what the CUDA issue measured).
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


# ----------------------------------------------------------------------------- the model
def build_model_dir(args, path: Path) -> tuple[Path, int]:
    """A seeded random-weight Llama saved as a Hugging Face directory, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = PRESETS[args.preset]
    cfg = LlamaConfig(**spec, max_position_embeddings=args.max_model_len, rope_theta=500000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, spec["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(path))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path, n_params


# ----------------------------------------------------------------------------- tokenyard
class StepProfile:
    """Wall time of the engine's parts per step, and the GPU time of each forward pass (CUDA events)."""

    def __init__(self, engine, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.acc: dict[str, float] = defaultdict(float)
        self.events: list[tuple[object, object, bool]] = []   # (start, end, from a graph replay)
        self.decode_only = False
        for obj, name, key in ((engine.scheduler, "schedule", "schedule"),
                               (engine.scheduler, "update_from_output", "update"),
                               (engine.runner, "execute", "execute"),
                               (engine.outputs, "apply", "outputs")):
            self._time(obj, name, key)
        self._gpu(engine.runner.model, "forward", graph=False)
        if engine.runner.graphs is not None:
            self._gpu(engine.runner.graphs, "run", graph=True)
        real_schedule = engine.scheduler.schedule

        def schedule(*a, **k):
            out = real_schedule(*a, **k)
            self.decode_only = bool(out.chunks) and all(c.num_tokens == 1 for c in out.chunks)
            return out
        engine.scheduler.schedule = schedule

    def _time(self, obj, name: str, key: str) -> None:
        real = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.acc[key] += time.perf_counter() - t
        setattr(obj, name, wrapper)

    def _gpu(self, obj, name: str, graph: bool) -> None:
        real = getattr(obj, name)

        def wrapper(*a, **k):
            if not self.cuda or (not graph and self._inside):
                return real(*a, **k)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._inside = True
            try:
                return real(*a, **k)
            finally:
                self._inside = False
                end.record()
                self.events.append((start, end, graph))
        self._inside = False
        setattr(obj, name, wrapper)

    def snapshot(self) -> tuple[dict[str, float], int]:
        return dict(self.acc), len(self.events)

    def gpu_ms(self, first: int, last: int) -> float:
        return sum(s.elapsed_time(e) for s, e, _ in self.events[first:last])


def run_tokenyard(args, model_dir: Path, prompts, single_prompt) -> tuple[dict, list[list[int]]]:
    from tokenyard import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              num_kv_blocks=args.num_kv_blocks)
    engine = llm.engine
    load_s = time.perf_counter() - t0
    runner = engine.runner
    info = {
        "load_s": load_s,
        "attention_backend": runner.model.attn_backend,
        "cuda_graphs": runner.graphs is not None,
        "graph_buckets": runner.graphs.buckets if runner.graphs is not None else [],
        "graph_capture_s": runner.graphs.capture_s if runner.graphs is not None else 0.0,
        "kv_blocks": engine.kv.pool.num_blocks,
        "kv_gb": engine.kv.pool.num_blocks * engine.kv_block_bytes / 1e9,
    }
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    # Warm-up: Triton compiles its kernels for the shapes of prefill and mixed steps.
    llm.generate([p[:64] for p in prompts[:4]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    sync(args.device)

    single = tokenyard_single_stream(engine, single_prompt, params)

    # Offline throughput: every request arrives at once.
    prof = StepProfile(engine, args.device)
    ids = [engine.add_request(p, params) for p in prompts]
    first_token: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    steps = []
    n_out = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        before, ev0 = prof.snapshot()
        s = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        after, ev1 = prof.snapshot()
        steps.append({"wall": now - s, "decode_only": prof.decode_only, "events": (ev0, ev1),
                      **{k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}})
        for o in outs:
            first_token.setdefault(o.request_id, now - start)
            if o.finished:
                outputs[o.request_id] = o.token_ids
        n_out += len(outs)
    elapsed = time.perf_counter() - start
    sync(args.device)
    for st in steps:
        st["gpu"] = prof.gpu_ms(*st.pop("events")) / 1000 if prof.cuda else 0.0

    def breakdown(rows: list[dict]) -> dict:
        if not rows:
            return {}
        keys = ("wall", "gpu", "schedule", "execute", "update", "outputs")
        mean = {k: 1000 * statistics.fmean(r.get(k, 0.0) for r in rows) for k in keys}
        # execute = prepare + launch (or graph replay) + wait for the GPU + sampling; the GPU's part is "gpu".
        mean["execute_host"] = mean["execute"] - mean["gpu"]
        mean["other_python"] = mean["wall"] - mean["schedule"] - mean["execute"] - mean["update"] - mean["outputs"]
        return {"steps": len(rows), "mean_ms": mean,
                "median_wall_ms": 1000 * statistics.median(r["wall"] for r in rows),
                "gpu_share": mean["gpu"] / mean["wall"] if mean["wall"] else 0.0}

    decode_steps = [s for s in steps if s["decode_only"]]
    ttfts = [first_token[i] for i in ids]
    result = {
        **info,
        "single": single,
        "throughput": {
            "elapsed_s": elapsed, "output_tokens": n_out, "output_tok_s": n_out / elapsed,
            "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99), "steps": len(steps),
            "preemptions": engine.scheduler.num_preemptions,
            "graph_replays": runner.graphs.num_replays if runner.graphs is not None else 0,
        },
        "step_breakdown": {"decode_only": breakdown(decode_steps),
                           "with_prefill": breakdown([s for s in steps if not s["decode_only"]])},
    }
    ordered = [outputs[i] for i in ids]
    del llm, engine, runner, prof
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result, ordered


# ----------------------------------------------------------------------------- transformers
def run_transformers(args, model_dir: Path, prompts, single_prompt, tokenyard_outputs) -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, args.dtype)).to(args.device)
    model.eval()
    load_s = time.perf_counter() - t0
    hf = StaticBatchGenerator(model, args.device)
    single = hf.single_stream(single_prompt, args.output_len)

    # Static batches one after another; a request's first token comes once its batch's prefill is done
    # (measured per batch with max_new_tokens=1, outside the timed run).
    batches = [prompts[i:i + args.hf_batch_size] for i in range(0, len(prompts), args.hf_batch_size)]
    prefill_s = []
    for b in batches:
        t = time.perf_counter()
        hf.generate(b, 1)
        prefill_s.append(time.perf_counter() - t)
    ttfts = []
    n_out = 0
    batch_outputs: list[list[int]] = []   # the first batch's tokens, for transformers' own agreement
    start = time.perf_counter()
    for i, (b, pf) in enumerate(zip(batches, prefill_s)):
        ttfts += [time.perf_counter() - start + pf] * len(b)
        outs = hf.generate(b, args.output_len)
        n_out += sum(map(len, outs))
        if i == 0:
            batch_outputs = outs
    elapsed = time.perf_counter() - start

    # The same check of transformers' own batched (left-padded) outputs against its unpadded forward: how
    # much two correct bf16 computations of this model disagree, the floor for tokenyard's number.
    agreement = {"tokenyard": bf16_agreement(model, prompts, tokenyard_outputs, args),
                 "transformers_batched": bf16_agreement(model, prompts, batch_outputs, args)}
    hf = model = None   # free it before the caller goes on
    gc.collect()
    return {"load_s": load_s, "single": single,
            "throughput": {"elapsed_s": elapsed, "output_tokens": n_out, "output_tok_s": n_out / elapsed,
                           "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99),
                           "batch_size": args.hf_batch_size}}, agreement


def bf16_agreement(model, prompts, outputs, args) -> dict:
    """Teacher-forced: transformers' greedy token at each of the first ``agree_tokens`` positions of tokenyard's
    outputs, given the same prefix; first tokens compared on their own."""
    same = total = first_same = 0
    worst = 0.0
    n = min(args.agree_requests, len(prompts))
    for prompt, out in zip(prompts[:n], outputs[:n]):
        out = out[: args.agree_tokens]
        ids = torch.tensor([prompt + out], device=args.device)
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        best = logits.argmax(-1).tolist()
        same += sum(a == b for a, b in zip(best, out))
        total += len(out)
        first_same += best[0] == out[0]
        ours = logits[torch.arange(len(out)), torch.tensor(out, device=args.device)]
        top = logits.max(-1).values
        worst = max(worst, float(((top - ours) / top.abs().clamp(min=1e-3)).max()))
    return {"requests": n, "tokens": total, "agree": same, "agree_share": same / max(total, 1),
            "first_tokens_identical": first_same, "worst_relative_gap": worst}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", default="128:1024", help="prompt lengths, uniform in LO:HI")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--single-input-len", type=int, default=512)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="tokenyard's share (transformers runs after it, in the same process)")
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--agree-requests", type=int, default=16)
    ap.add_argument("--agree-tokens", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--model-dir", default="/tmp/tokenyard-bench-gpu-model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    args = ap.parse_args()

    t = time.perf_counter()
    model_dir, n_params = build_model_dir(args, Path(args.model_dir) / args.preset)
    print(f"built a random {args.preset} Llama ({n_params / 1e9:.2f}B parameters, {args.dtype}) in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    vocab = PRESETS[args.preset]["vocab_size"]
    lo, hi = (int(x) for x in args.input_len.split(":"))
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(args.num_requests)]
    single_prompt = [rng.randrange(3, vocab) for _ in range(args.single_input_len)]

    results: dict = {"config": vars(args) | {"parameters": n_params, "torch": torch.__version__,
                                              "machine": platform.processor() or platform.machine()}}
    if args.device.startswith("cuda"):
        results["config"]["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results["tokenyard"], ty_outputs = run_tokenyard(args, model_dir, prompts, single_prompt)
    out.write_text(json.dumps(results, indent=2))   # kept even if the baseline fails
    print(json.dumps(results["tokenyard"], indent=1), flush=True)
    if not args.skip_hf:
        results["transformers"], results["agreement"] = run_transformers(args, model_dir, prompts, single_prompt,
                                                                        ty_outputs)
        ty, hf = results["tokenyard"], results["transformers"]
        results["ratios_tokenyard_over_transformers"] = {
            "throughput": ty["throughput"]["output_tok_s"] / hf["throughput"]["output_tok_s"],
            "single_stream_decode": ty["single"]["decode_tok_s"] / hf["single"]["decode_tok_s"],
        }
    out.write_text(json.dumps(results, indent=2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['config'].get('gpu', args.device)}: {args.num_requests} requests, prompts "
                        f"{args.input_len}, outputs {args.output_len}, {args.preset} Llama {args.dtype}")
    for col in ("system", "gen tok/s", "TTFT P50 s", "TTFT P99 s", "elapsed s", "1-stream tok/s",
                "1-stream TTFT ms"):
        table.add_column(col, justify="right")
    for name in ("tokenyard", "transformers"):
        if name in results:
            r = results[name]
            tp = r["throughput"]
            table.add_row(name, f"{tp['output_tok_s']:.0f}", f"{tp['ttft_p50_s']:.2f}", f"{tp['ttft_p99_s']:.2f}",
                          f"{tp['elapsed_s']:.1f}", f"{r['single']['decode_tok_s']:.0f}",
                          f"{1000 * r['single']['ttft_s']:.0f}")
    console = Console()
    console.print(table)
    if "ratios_tokenyard_over_transformers" in results:
        console.print(f"tokenyard / transformers: {results['ratios_tokenyard_over_transformers']}")
        for who, a in results["agreement"].items():
            console.print(f"bf16 agreement (teacher-forced), {who}: {a}")
    console.print(f"step breakdown (mean ms): {json.dumps(results['tokenyard']['step_breakdown'], indent=1)}")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()

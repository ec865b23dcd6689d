"""Block-quantized weights on CPU (``--quantization``): kernels against dequantize-then-matmul, GGUF blocks kept
bit for bit, and the quantized model's greedy output against the same model in fp32."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tokenyard import LLM, EngineConfig, SamplingParams
from tokenyard.engine.llm_engine import resolve_quantization
from tokenyard.model import quant
from tokenyard.model.loader import QUANT_FILE, resolve_model
from tokenyard.model.paged_attention import load_kernel

kernel = load_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="C++ kernel could not be built here")


def _random_quant(kind: str, n: int, k: int, seed: int) -> quant.QuantWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return quant.quantize(w, kind)


def _tiles_isa() -> str:
    return kernel.quant_isa().split("+")[0]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 300])   # tiles of 4 rows and leftovers; 300: two row chunks
@pytest.mark.parametrize("n,k", [(6, 64), (202, 576)])     # weight rows in fours and leftovers
def test_fp32_tile_paths_match_dequantize_then_matmul(isa, kind, rows, n, k, monkeypatch):
    """The fp32 paths (weights dequantized, fp32 products; what runs when the caller keeps fp32 activations, and
    on a CPU without int8 or bf16 paths): fp32 rounding only, whatever the batch."""
    monkeypatch.setenv("TOKENYARD_QUANT_ISA", isa)
    if _tiles_isa() != isa:
        pytest.skip(f"this CPU has no {isa} path")
    w = _random_quant(kind, n, k, seed=rows + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(n)
    ref = x @ w.dequantize().T + bias
    got = quant.linear(x, w, bias, round_activations=False)
    if isa == "scalar":   # the scalar build has no rounding paths at all
        torch.testing.assert_close(quant.linear(x, w, bias), got, rtol=0, atol=0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(kernel.quant_dequantize(*w.parts()), w.dequantize())


@pytest.mark.parametrize("isa", ["", "avx2"])   # the best this CPU has (VNNI where present), AVX2's maddubs
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("n,k", [(6, 64), (202, 576), (9, 96)])   # 96: an odd number of blocks
def test_int8_activation_path_is_within_activation_rounding(isa, kind, rows, n, k, monkeypatch):
    """With AVX-512 VNNI or AVX2, up to 3 rows run with int8 activations (per 32-block absmax scaling, as
    llama.cpp): each product's activation is off by at most half a step, max|x_block| / 254; the output error is
    bounded by the sum of |w| times that, and is far below the weights' own quantization error."""
    if isa:
        monkeypatch.setenv("TOKENYARD_QUANT_ISA", isa)
    name = kernel.quant_isa()
    if "vnni" not in name and "int8" not in name:
        pytest.skip(f"no int8 path here ({name}): every batch takes the fp32 path")
    w = _random_quant(kind, n, k, seed=rows + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    wd = w.dequantize()
    ref = x @ wd.T
    step = x.view(rows, -1, quant.BLOCK).abs().amax(-1).repeat_interleave(quant.BLOCK, 1) / 254
    bound = step @ wd.abs().T
    got = quant.linear(x, w)
    assert bool(((got - ref).abs() <= bound * 1.001 + 1e-6).all())
    assert float((got - ref).abs().max()) > 1e-4 * float(ref.abs().max())   # the int8 path was taken
    # The output layer asks for fp32 activations: exact to rounding, whatever the CPU has.
    exact = quant.linear(x, w, round_activations=False)
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [4, 5, 17, 300])   # a 4 x 4 tile, leftover rows, two row chunks
@pytest.mark.parametrize("n,k", [(6, 64), (202, 576), (9, 96)])
def test_bf16_path_is_within_bf16_rounding(kind, rows, n, k):
    """With AVX512-BF16, four rows and more run with activations and dequantized weights rounded to bf16 (8
    significant bits, round to nearest even) and fp32 sums: each product is off by at most (2 u + u^2) |w x|
    with u = 2^-8, so the output by that times sum |w| |x|, plus fp32 summation error."""
    if "bf16" not in kernel.quant_isa():
        pytest.skip("no AVX512-BF16 here: four rows and more take the fp32 tile path")
    w = _random_quant(kind, n, k, seed=rows + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    wd = w.dequantize()
    ref = x @ wd.T
    u = 2.0 ** -8
    bound = (2 * u + u * u) * (x.abs() @ wd.abs().T) + 1e-5 * float(ref.abs().max())
    got = quant.linear(x, w)
    assert bool(((got - ref).abs() <= bound).all())
    assert float((got - ref).abs().max()) > 1e-4 * float(ref.abs().max())   # the bf16 path was taken
    # Rounded inputs, exact sums: what the kernel computes, to fp32 summation error. (Its weights are
    # scale * q + min fused, one rounding, before bf16.)
    fused = quant.QuantWeight(w.q, w.scales.double(), None if w.mins is None else w.mins.double()).dequantize()
    rounded = x.bfloat16().float() @ fused.float().bfloat16().float().T
    torch.testing.assert_close(got, rounded, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    exact = quant.linear(x, w, round_activations=False)
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_kernel_isa_is_named(monkeypatch):
    assert kernel.quant_isa().split("+")[0] in ("avx512", "avx2", "scalar")
    monkeypatch.setenv("TOKENYARD_QUANT_ISA", "scalar")
    assert kernel.quant_isa() == "scalar"


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_quantize_error_is_within_half_a_step(kind):
    w = torch.randn(64, 128) * 0.1
    q = quant.quantize(w, kind)
    step = q.scales.repeat_interleave(quant.BLOCK, dim=1)
    assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-7).all())


def test_gguf_blocks_are_kept_exactly():
    """The converted cache holds the GGUF's Q4_1 / Q8_0 blocks; dequantized, they are gguf's own dequantization."""
    import gguf
    from safetensors.torch import load_file

    from tokenyard.model.loader import bundled_model_path

    try:
        path = bundled_model_path()
    except ValueError as e:
        pytest.skip(str(e))
    reader = gguf.GGUFReader(str(path))
    stored = load_file(str(resolve_model(None).hf_dir / QUANT_FILE))
    checked = set()
    for t in reader.tensors:
        if t.name not in ("token_embd.weight", "blk.3.ffn_down.weight", "blk.3.attn_v.weight"):
            continue
        hf = {"token_embd.weight": "model.embed_tokens.weight", "blk.3.ffn_down.weight":
              "model.layers.3.mlp.down_proj.weight", "blk.3.attn_v.weight": "model.layers.3.self_attn.v_proj.weight"}
        base = hf[t.name]
        w = quant.QuantWeight(stored[base + ".q"], stored[base + ".scales"], stored.get(base + ".mins"))
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        assert torch.equal(w.dequantize(), torch.from_numpy(ref.reshape(w.shape)))
        checked.add(t.tensor_type.name)
    assert checked == {"Q4_1", "Q8_0"}


# --------------------------------------------------------------------------- the model
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:",
           "The best way to learn a language is", "import numpy as np\n", "Water boils at", "My favourite season"]


@pytest.fixture(scope="module")
def bundled_pair():
    try:
        resolve_model(None)
    except ValueError as e:
        pytest.skip(str(e))
    quantized = LLM(max_num_batched_tokens=64, kv_cache_memory_gb=0.25, check_invariants=True)
    fp32 = LLM(max_num_batched_tokens=64, kv_cache_memory_gb=0.25, quantization="none")
    return quantized, fp32


def test_bundled_gguf_runs_its_own_4bit_blocks(bundled_pair):
    quantized, fp32 = bundled_pair
    assert quantized.engine.quantization == "auto" and fp32.engine.quantization == "none"
    w = quantized.engine.runner.model.w
    assert isinstance(w.layers[0].qkv, quant.QuantWeight) and w.layers[0].qkv.kind == "q4_1"
    assert isinstance(w.embed, quant.QuantWeight) and w.embed.kind == "q8_0"
    q_bytes = sum(t.nbytes for lw in w.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down)) + w.embed.nbytes
    f = fp32.engine.runner.model.w
    f_bytes = sum(t.numel() * 4 for lw in f.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down)) + f.embed.numel() * 4
    assert q_bytes < f_bytes / 4.5   # 5 bits a weight (9 for the embedding) instead of 32: 4.8x here


def test_quantized_greedy_agrees_with_fp32(bundled_pair):
    """Identical first tokens, and >= 90% of the first 32 tokens the same, over a prompt set."""
    quantized, fp32 = bundled_pair
    p = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    a, b = quantized.generate(PROMPTS, p), fp32.generate(PROMPTS, p)
    same = sum(x == y for qa, fb in zip(a, b) for x, y in zip(qa.token_ids, fb.token_ids))
    assert all(qa.token_ids[0] == fb.token_ids[0] for qa, fb in zip(a, b))
    assert same / (32 * len(PROMPTS)) >= 0.9, f"{same} of {32 * len(PROMPTS)} tokens agree"
    assert quantized.engine.kv.num_used_blocks == 0


def test_kernel_pool_spins_long_only_in_decode_only_steps(bundled_pair, monkeypatch):
    """Steps with prefill run ATen ops between the kernels and need the cores: the pool's idle workers must sleep
    soon there, and spin long only in decode-only steps (the C++ layer loop)."""
    calls: list[bool] = []
    real = kernel.pool_spin_long
    monkeypatch.setattr(kernel, "pool_spin_long", lambda on: (calls.append(on), real(on)))
    bundled_pair[0].generate(["Once upon a time"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert calls == [False, True, True, True]   # the prefill step, then three decode-only steps


def test_cpp_layer_loop_equals_python_loop_on_quantized_weights(bundled_pair):
    """A decode-only step through the C++ layer loop (quantized linears inside) gives the Python loop's bits."""
    from tokenyard.sched.output import ScheduledChunk

    runner = bundled_pair[0].engine.runner
    g = torch.Generator().manual_seed(0)
    k0 = torch.randn(runner.k_cache.shape, generator=g) * 0.1
    chunks = [ScheduledChunk(str(i), [70 + i], 5 + 3 * i, list(range(4 * i, 4 * i + 4)), True) for i in range(3)]
    ids, pos, meta, rows, _ = runner._prepare(chunks, [])
    model = runner.model
    results = []
    for fused in (True, False):
        kc = runner.k_cache.clone().copy_(k0)
        vc = runner.v_cache.clone().copy_(k0)
        model.fuse_decode_layers = fused
        results.append(model.forward(ids, pos, meta, kc, vc, rows))
    model.fuse_decode_layers = True
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("mode,first_same", [("int8", 6), ("q4", 3)])
def test_fp32_checkpoint_quantized_at_load(tiny_llama_dir, mode, first_same):
    """An HF directory quantized at load. The tiny random model has near-flat logits and 64-wide rows (two
    blocks), so free-running agreement says little; first tokens: all equal with int8, most with q4."""
    q = LLM(model=str(tiny_llama_dir), block_size=4, num_kv_blocks=64, quantization=mode)
    f = LLM(model=str(tiny_llama_dir), block_size=4, num_kv_blocks=64)
    assert isinstance(q.engine.runner.model.w.layers[0].qkv, quant.QuantWeight)
    assert not isinstance(f.engine.runner.model.w.layers[0].qkv, quant.QuantWeight)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(4, 30))] for _ in range(6)]
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    a, b = q.generate(prompts, p), f.generate(prompts, p)
    assert sum(qa.token_ids[0] == fb.token_ids[0] for qa, fb in zip(a, b)) >= first_same
    assert all(len(o.token_ids) == 16 for o in a)


def test_quantization_setting_is_validated():
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_quantization("auto", cuda, torch.bfloat16) == "none"
    assert resolve_quantization("auto", cpu, torch.bfloat16) == "none"
    assert resolve_quantization("auto", cpu, torch.float32) == "auto"
    with pytest.raises(ValueError, match="runs on CPU"):
        resolve_quantization("int8", cuda, torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        resolve_quantization("q4", cpu, torch.bfloat16)

"""The C++ ops: fused ones are bit-identical to the PyTorch ops they replace; decode attention matches SDPA."""

from __future__ import annotations

import pytest
import torch

from tokenyard.model.paged_attention import decode_attention, load_kernel

kernel = load_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="C++ kernel could not be built here")


@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize("hidden", [64, 576])
def test_rms_norm_apply_is_bit_identical(rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g) * 3
    w = torch.randn(hidden, generator=g)
    var = x.pow(2).mean(-1, keepdim=True)
    ref = (x * torch.rsqrt(var.clone().add_(1e-5))).mul_(w)  # the PyTorch path in model/llama.py
    assert torch.equal(kernel.rms_norm_apply(x, var, w, 1e-5), ref)


@pytest.mark.parametrize("tokens", [1, 5, 77])
def test_rope_and_cache_is_bit_identical(tokens):
    heads, kv_heads, dim, block = 9, 3, 64, 16
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    cos, sin = torch.randn(tokens, dim, generator=g), torch.randn(tokens, dim, generator=g)
    k_cache = torch.zeros(16, block, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(16 * block, generator=g)[:tokens]
    q, k = kernel.rope_and_cache(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads)
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    ref = qk * cos.unsqueeze(1) + qk.roll(dim // 2, -1) * sin.unsqueeze(1)
    assert torch.equal(q, ref[:, :heads]) and torch.equal(k, ref[:, heads:])
    assert torch.equal(k_cache.view(-1, kv_heads, dim)[slots], ref[:, heads:])
    v = qkv[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
    assert torch.equal(v_cache.view(-1, kv_heads, dim)[slots], v)


@pytest.mark.parametrize("n", [1, 2, 9])  # 1 and 2 split work by kv head, 9 by sequence
def test_decode_attention_matches_sdpa_fallback(n):
    heads, kv_heads, dim, block, num_blocks = 9, 3, 64, 16, 64
    g = torch.Generator().manual_seed(n)
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    lens = torch.randint(1, 5 * block, (n,), generator=g)
    width = int((lens.max() + block - 1) // block)
    tables = torch.randperm(num_blocks, generator=g)[: n * width].view(n, width)
    mask = (torch.arange(width * block)[None, :] < lens[:, None])[:, None, None, :]
    q = torch.randn(n, heads, dim, generator=g)
    fast = decode_attention(q, k_cache, v_cache, tables, lens, mask, dim ** -0.5, "cpu-kernel")
    slow = decode_attention(q, k_cache, v_cache, tables, lens, mask, dim ** -0.5, "sdpa")
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_decode_layers_in_cpp_equal_the_python_loop(tiny_model_dir):
    """A decode-only step through the C++ layer loop gives bit-identical logits and KV to the Python loop."""
    from tokenyard import LLM
    from tokenyard.sched.output import ScheduledChunk

    llm = LLM(model=str(tiny_model_dir), block_size=4, num_kv_blocks=64)
    runner = llm.engine.runner
    g = torch.Generator().manual_seed(0)
    runner.k_cache.copy_(torch.randn(runner.k_cache.shape, generator=g))
    runner.v_cache.copy_(torch.randn(runner.v_cache.shape, generator=g))
    chunks = [ScheduledChunk(str(i), [7 + i], 5 + 3 * i, list(range(4 * i, 4 * i + 4)), True) for i in range(3)]
    ids, pos, meta, rows, _ = runner._prepare(chunks, [])
    model = runner.model
    results = []
    for fused in (True, False):
        k, v = runner.k_cache.clone(), runner.v_cache.clone()
        model.fuse_decode_layers = fused
        results.append((model.forward(ids, pos, meta, k, v, rows), k, v))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_build_lock_clears_a_stale_torch_baton(tmp_path):
    """A build killed mid-compile leaves torch's `lock` file; later starts must not wait on it forever."""
    import subprocess
    import sys

    from tokenyard.model.paged_attention import build_lock

    (tmp_path / "lock").write_text("")
    with build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    # While one process holds the build lock, another waits for it (and then finds no stale baton).
    code = ("import sys, time; from pathlib import Path; from tokenyard.model.paged_attention import build_lock\n"
            "with build_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(1.0)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    import time

    t0 = time.monotonic()
    with build_lock(tmp_path):
        waited = time.monotonic() - t0
    holder.wait(timeout=30)
    assert waited > 0.3

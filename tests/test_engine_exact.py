"""tokenyard's greedy tokens equal transformers' greedy generate, under every scheduling situation."""

from __future__ import annotations

import random

import pytest

from tests.reference import hf_greedy
from tokenyard import LLM, SamplingParams

MAX_NEW = 12


def _prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _check(llm: LLM, model_dir, prompts: list[list[int]], max_new: int = MAX_NEW):
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model_dir, prompt, max_new), f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_used_blocks == 0
    engine.scheduler.check_invariants()
    return outs


def _llm(model_dir, **kw) -> LLM:
    kw.setdefault("block_size", 4)
    kw.setdefault("check_invariants", True)
    return LLM(model=str(model_dir), **kw)


def test_batch_of_one(tiny_model_dir):
    _check(_llm(tiny_model_dir), tiny_model_dir, _prompts(1, 7, 7))


def test_batch_of_many_mixed_lengths(tiny_model_dir):
    _check(_llm(tiny_model_dir), tiny_model_dir, _prompts(8, 1, 60, seed=1))


def test_chunked_prefill_with_budget_smaller_than_prompt(tiny_model_dir):
    llm = _llm(tiny_model_dir, max_num_batched_tokens=16)
    _check(llm, tiny_model_dir, _prompts(5, 20, 70, seed=2))


def test_prefix_cache_hits(tiny_model_dir):
    llm = _llm(tiny_model_dir, max_num_batched_tokens=32)
    shared = _prompts(1, 30, 30, seed=3)[0]
    first = [shared + [5, 6, 7]]
    _check(llm, tiny_model_dir, first)
    second = [shared + tail for tail in ([9], [10, 11, 12, 13, 14], [])]
    outs = _check(llm, tiny_model_dir, second)
    assert all(o.num_cached_tokens >= 28 for o in outs), [o.num_cached_tokens for o in outs]
    # A prompt that is entirely cached still runs its last token.
    outs = _check(llm, tiny_model_dir, [shared[:28]])
    assert outs[0].num_cached_tokens == 24


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_forced_preemption(tiny_model_dir, mode):
    # 20 blocks of 4 tokens = 80 tokens of KV for 6 requests that need ~45 each.
    llm = _llm(tiny_model_dir, num_kv_blocks=20, num_host_blocks=200, preemption_mode=mode,
               enable_prefix_caching=False)
    _check(llm, tiny_model_dir, _prompts(6, 25, 40, seed=4), max_new=16)
    assert llm.engine.scheduler.num_preemptions > 0
    if mode == "swap":
        assert llm.engine.kv.host_pool.num_free_blocks == 200


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("policy", ["fcfs", "priority", "vtc", "vtc+priority"])
def test_every_policy_with_forced_preemption_keeps_outputs_exact(tiny_model_dir, policy, mode):
    """Mixed priorities and tenants on a pool too small for all of them, priorities changed mid-run."""
    llm = _llm(tiny_model_dir, num_kv_blocks=24, scheduling_policy=policy, preemption_mode=mode,
               num_host_blocks=100, max_num_batched_tokens=24, tenant_weights="t0=2")
    engine = llm.engine
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    low = _prompts(4, 20, 30, seed=5)
    high = _prompts(2, 20, 30, seed=6)
    ids = {engine.add_request(p, params, priority=5, tenant=f"t{i % 2}"): p for i, p in enumerate(low)}
    for _ in range(3):
        engine.step()
    ids.update({engine.add_request(p, params, priority=0, tenant="t2"): p for p in high})
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        if steps == 6:
            assert engine.set_priority(next(iter(ids)), 0)   # the oldest low request becomes urgent
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert engine.scheduler.num_preemptions > 0
    for rid, prompt in ids.items():
        assert done[rid].token_ids == hf_greedy(tiny_model_dir, prompt, 16)
    assert engine.kv.num_used_blocks == 0
    assert not engine.set_priority(next(iter(ids)), 1)       # finished: nothing to change
    service = engine.tenant_stats()
    assert set(service) >= {"t0", "t1", "t2"} and all(svc > 0 for svc, _ in service.values())


def test_abort_mid_batch(tiny_model_dir):
    llm = _llm(tiny_model_dir, max_num_batched_tokens=16)
    engine = llm.engine
    prompts = _prompts(4, 10, 30, seed=7)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    for _ in range(4):
        engine.step()
    aborted = engine.abort_request([ids[1], ids[3]])
    assert [o.finish_reason for o in aborted] == ["abort", "abort"]
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert set(done) == {ids[0], ids[2]}
    for i in (0, 2):
        assert done[ids[i]].token_ids == hf_greedy(tiny_model_dir, prompts[i], MAX_NEW)
    assert engine.kv.num_used_blocks == 0
    engine.scheduler.check_invariants()


def test_pytorch_fallback_path_is_exact(tiny_model_dir):
    """The pure-PyTorch path (no C++ kernel: no compiler, or CUDA) gives the same tokens."""
    llm = _llm(tiny_model_dir, max_num_batched_tokens=16)
    llm.engine.runner.model.use_kernel = False
    _check(llm, tiny_model_dir, _prompts(5, 1, 40, seed=8))


def test_llama_with_attention_and_mlp_biases_is_exact(tmp_path):
    """o_proj and MLP biases used to be dropped silently (wrong numerics); now they are applied."""
    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "biases", "llama-biases", seed=3)
    llm = _llm(model_dir, max_num_batched_tokens=16)
    _check(llm, model_dir, _prompts(4, 1, 40, seed=9))
    assert llm.engine.runner.model.extra_biases


def test_checkpoint_with_unused_weights_is_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "extra", "llama", seed=4)
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.0.mlp.mystery.weight"] = torch.zeros(4)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not use: model.layers.0.mlp.mystery.weight"):
        LLM(model=str(model_dir), block_size=4)

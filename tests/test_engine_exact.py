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
    kw.setdefault("dtype", "float32")   # the reference is fp32 (on CUDA the default would be bf16)
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
    llm.engine.runner.model.set_attn_backend("sdpa")
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


# --------------------------------------------------------------------------- context switches (KV in flight)
def _run_with_priority_churn(engine, prompts, max_new, every=4, abort_in=()):
    """Priorities flip every few steps so requests are swapped out and back in; abort one request the first time
    it is seen in each state of ``abort_in``. Returns finished outputs by request id and the aborted ids."""
    from tokenyard.sched.request import RequestStatus

    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params, priority=i % 3) for i, p in enumerate(prompts)]
    done, aborted, steps = {}, set(), 0
    states = set(abort_in)
    while engine.has_unfinished_requests():
        steps += 1
        if steps % every == 0:
            live = [r for r in ids if r in engine.scheduler.requests]
            for k, rid in enumerate(live):
                engine.set_priority(rid, (k + steps // every) % 3)
        for state in list(states):
            hit = next((r for r in engine.scheduler.requests.values() if r.status is RequestStatus(state)), None)
            if hit is not None:
                engine.abort_request(hit.request_id)
                aborted.add(hit.request_id)
                states.discard(state)
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        assert steps < 2000
    return ids, done, aborted


def _hold_first_swap_in_one_step(engine) -> None:
    """On CPU a swap-in's copy lands within its step, so between steps nobody is ever seen SWAPPING_IN. Hold the
    first swap-in's completion back one step (as a slow copy would), so the test can abort it mid-transfer."""
    from tokenyard.sched.request import RequestStatus

    poll, held, armed = engine.runner.poll_transfers, [], [True]
    flight = engine.scheduler.in_flight

    def held_poll(block: bool = False) -> list[int]:
        got = held + poll(block)
        held.clear()
        if armed[0] and any(t in flight and flight[t].status is RequestStatus.SWAPPING_IN for t in got):
            armed[0] = False
            held.extend(got)
            return []
        return got

    engine.runner.poll_transfers = held_poll


@pytest.mark.parametrize("overlap,groups,reuse", [(True, True, True), (False, False, False), (True, False, True),
                                                  (False, True, False)])
def test_swap_variants_keep_outputs_exact_under_churn_and_aborts(tiny_model_dir, overlap, groups, reuse):
    """Block groups, overlapped swaps and host reuse, each on and off, under forced preemption with priorities
    changing at runtime; a request aborted while swapping in (overlap) or while swapped out."""
    llm = _llm(tiny_model_dir, num_kv_blocks=24, num_host_blocks=200, preemption_mode="swap",
               scheduling_policy="priority", max_num_batched_tokens=24, swap_overlap=overlap,
               swap_block_groups=groups, host_prefix_cache=reuse)
    engine = llm.engine
    prompts = _prompts(6, 20, 34, seed=11)
    abort_in = ("swapping_in",) if overlap else ("swapped",)
    if overlap:
        _hold_first_swap_in_one_step(engine)
    ids, done, aborted = _run_with_priority_churn(engine, prompts, 16, abort_in=abort_in)
    assert aborted, f"no request was ever {abort_in[0]}"
    for rid, prompt in zip(ids, prompts):
        if rid not in aborted:
            assert done[rid].token_ids == hf_greedy(tiny_model_dir, prompt, 16)
    kv = engine.kv
    assert kv.swap_in_blocks > 0 and engine.scheduler.num_preemptions > 0
    assert kv.num_used_blocks == 0 and kv.host_pool.num_used_blocks == 0 and not kv.transfers
    if not groups:
        assert kv.swap_copies == kv.swap_out_blocks + kv.swap_in_blocks, "one copy per block without groups"
    else:
        assert kv.swap_copies < kv.swap_out_blocks + kv.swap_in_blocks, "runs of blocks copied as one"
    if reuse:
        assert kv.swap_out_reused_blocks > 0, "a second swap-out found blocks already on the host"
    else:
        assert kv.swap_out_reused_blocks == 0


def test_next_turn_loads_its_history_from_the_host_and_stays_exact(tiny_model_dir):
    """Turn 1 is swapped out; its device prefix cache is dropped; turn 2 (turn 1 + reply + new message) finds
    the history on the host and computes only the rest, with the same tokens as a full recompute."""
    llm = _llm(tiny_model_dir, num_kv_blocks=24, num_host_blocks=200, preemption_mode="swap",
               scheduling_policy="priority", max_num_batched_tokens=24)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    turn1 = _prompts(1, 40, 40, seed=12)[0]
    rid = engine.add_request(turn1, params, priority=5)
    for _ in range(3):
        engine.step()
    for p in _prompts(2, 30, 30, seed=13):     # urgent requests push turn 1 out to the host
        engine.add_request(p, params, priority=0)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert engine.kv.swap_out_blocks > 0
    engine.kv.pool.reset_prefix_cache()
    turn2 = turn1 + outs[rid].token_ids + [17, 18, 19]
    out2 = llm.generate([turn2], params)[0]
    assert out2.token_ids == hf_greedy(tiny_model_dir, turn2, 8)
    assert engine.kv.host_prefix_hits >= 40 // 4 * 4 - 4 and out2.num_cached_tokens >= 36

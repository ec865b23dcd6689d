"""Bad input gets a clear ValueError naming the parameter, raised before any state changes."""

from __future__ import annotations

import json

import pytest

from tokenyard import LLM, InvalidParameterError, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), block_size=4, check_invariants=True)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(logprobs=-1), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(seed=2**64), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(min_p=1.5), "min_p"),
        (dict(logit_bias={5: 101}), "logit_bias"),
        (dict(logit_bias={-1: 1}), "logit_bias"),
    ],
)
def test_bad_sampling_params(kwargs, param):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    assert param in str(e.value)


def _assert_untouched(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_used_blocks == 0
    engine.scheduler.check_invariants()


def test_empty_prompt(llm):
    for bad in ("", []):
        with pytest.raises(ValueError, match="prompt"):
            llm.generate(["w5 w6", bad])
    _assert_untouched(llm)


def test_prompt_longer_than_context(llm):
    too_long = [5] * llm.engine.max_model_len
    with pytest.raises(ValueError, match="context window"):
        llm.generate([[5, 6, 7], too_long])
    _assert_untouched(llm)


def test_max_tokens_beyond_the_context_window_is_refused_not_clamped(llm):
    room = llm.engine.max_model_len - 3
    with pytest.raises(ValueError, match="max_tokens") as e:
        llm.generate([[5, 6], [5, 6, 7]], SamplingParams(max_tokens=room + 1))
    assert f"at most {room}" in str(e.value)
    _assert_untouched(llm)


def test_logit_bias_outside_vocabulary(llm):
    with pytest.raises(InvalidParameterError) as e:
        llm.generate([[5, 6]], SamplingParams(max_tokens=2, logit_bias={10**6: 1.0}))
    assert e.value.param == "logit_bias"
    _assert_untouched(llm)


def test_token_id_outside_vocabulary(llm):
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[5, 6, 100000]])
    _assert_untouched(llm)


def test_seeds_at_the_ends_of_the_range(llm):
    # Whatever torch.Generator.manual_seed takes is accepted (the server passes int64 seeds, plus i for choice i).
    for seed in (-(2**63), 0, 2**63 - 1, 2**64 - 1):
        out = llm.generate(["w5 w6"], SamplingParams(max_tokens=2, temperature=1.0, seed=seed, ignore_eos=True))
        assert len(out[0].token_ids) == 2
    _assert_untouched(llm)


def _assert_no_state(engine, rid):
    assert rid not in engine.scheduler.requests
    assert rid not in engine.runner.states
    assert rid not in engine.outputs and rid not in engine.scheduler.requests
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_used_blocks == 0
    engine.scheduler.check_invariants()


def test_add_request_refused_by_scheduler_leaves_no_state(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), block_size=4, num_kv_blocks=8, check_invariants=True)  # 32 tokens of KV
    engine = llm.engine
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=100), request_id="too-big")
    _assert_no_state(engine, "too-big")
    # The id is free again and the engine still serves.
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), request_id="too-big")
    while engine.has_unfinished_requests():
        engine.step()


def test_add_request_failing_in_runner_leaves_no_state(llm, monkeypatch):
    engine = llm.engine

    def boom(rid, params, stop_token_ids=(), prompt_token_ids=None):
        raise RuntimeError("no sample state today")

    monkeypatch.setattr(engine.runner, "add_request", boom)
    with pytest.raises(RuntimeError, match="no sample state"):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=3), request_id="runner-fails")
    _assert_no_state(engine, "runner-fails")


def test_request_id_reused_right_after_it_finished(llm):
    engine = llm.engine
    p = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    first = []
    engine.add_request([5, 6, 7], p, request_id="again")
    while engine.has_unfinished_requests():
        first += [o for o in engine.step() if o.finished]
    # The runner only forgets "again" at the next step; the new request must keep its own state.
    engine.add_request([5, 6, 7], p, request_id="again")
    second = []
    while engine.has_unfinished_requests():
        second += [o for o in engine.step() if o.finished]
    assert [o.token_ids for o in second] == [o.token_ids for o in first]
    _assert_untouched(llm)


def test_engine_still_serves_after_bad_input(llm):
    out = llm.generate(["w5 w6 w7"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3
    _assert_untouched(llm)


def test_unknown_model_path(tmp_path):
    with pytest.raises(ValueError, match="model"):
        LLM(model=str(tmp_path / "nope"))


def test_non_llama_architecture(tmp_path):
    d = tmp_path / "gpt2ish"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(1, dtype=np.float32)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(model=str(d))


def test_bad_engine_args(tiny_llama_dir):
    with pytest.raises(ValueError, match="preemption_mode"):
        LLM(model=str(tiny_llama_dir), preemption_mode="teleport")
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(model=str(tiny_llama_dir), scheduling_policy="random")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(model=str(tiny_llama_dir), max_num_batched_tokens=0)


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu", "mps"])
def test_unavailable_device_is_a_clear_error(tiny_llama_dir, device):
    import torch

    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device"):
        LLM(model=str(tiny_llama_dir), device=device)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_on_cpu(tiny_llama_dir, dtype):
    """bf16/fp16 used to crash on the first step (the RoPE tables stayed fp32); the first greedy token agrees
    with transformers in the same dtype (later ones may differ by rounding order, so they are not compared)."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(tiny_llama_dir), dtype=dtype, device="cpu", block_size=4, check_invariants=True)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=getattr(torch, dtype))
    with torch.no_grad():
        first = int(ref(torch.tensor([prompt])).logits[0, -1].argmax())
    assert out.token_ids[0] == first

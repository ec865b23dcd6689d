"""Sampling: seeds, stop strings and ids, logprobs, chat, text output."""

from __future__ import annotations

import pytest
import torch

from tokenyard import LLM, SamplingParams
from tokenyard.engine import sampler


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), block_size=4, check_invariants=True)


def test_same_seed_same_output_whatever_the_batch(llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate(["w10 w11 w12"], p)[0].token_ids
    others = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    batch = llm.generate(["w3 w4", "w10 w11 w12", "w9 w9 w9 w9"], [others, p, others])
    assert batch[1].token_ids == alone
    other_seed = SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)
    assert llm.generate(["w10 w11 w12"], other_seed)[0].token_ids != alone


def test_stop_token_ids_and_max_tokens(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = llm.generate(["w20 w21"], greedy)[0].token_ids
    out = llm.generate(["w20 w21"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                    stop_token_ids=[ref[2]]))[0]
    assert out.token_ids == ref[: ref.index(ref[2]) + 1]
    assert out.finish_reason == "stop"


def test_stop_strings_cut_the_text(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = llm.generate(["w30 w31"], greedy)[0]
    words = ref.text.split()
    stop = words[3]
    out = llm.generate(["w30 w31"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text
    assert ref.text.startswith(out.text)


def test_logprobs(llm):
    out = llm.generate(["w40 w41"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.logprob <= 0


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "w50 w51"}], SamplingParams(max_tokens=3, temperature=0))
    assert out[0].prompt_token_ids == llm.tokenizer.encode("user w50 w51 ")


def test_eos_stops_unless_ignored(llm):
    eos = llm.engine.tokenizer.eos_token_id
    ids = [5, 6, 7]
    out = llm.generate([ids], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[], ignore_eos=False))[0]
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == eos


def test_tiny_temperature_is_greedy(llm):
    assert SamplingParams(temperature=1e-40).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    prompts = ["w60 w61 w62", "w7 w8"]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    tiny = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=1e-40, ignore_eos=True))
    for g, t in zip(greedy, tiny):
        assert t.token_ids == g.token_ids
        assert t.finish_reason == "length"


def test_sampler_isolates_a_non_finite_row():
    logits = torch.randn(3, 32)
    logits[1] = float("nan")
    states = [sampler.make_sample_state(SamplingParams(temperature=1.0, seed=i, logprobs=2), torch.device("cpu"))
              for i in range(3)]
    tokens, logprobs = sampler.sample(logits, states)
    assert tokens[1] == sampler.SAMPLE_FAILED and logprobs[1] is None
    assert "not finite" in states[1].error
    for i in (0, 2):
        assert 0 <= tokens[i] < 32 and states[i].error is None
        assert logprobs[i].token_id == tokens[i]


def _assert_clean(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_used_blocks == 0
    engine.scheduler.check_invariants()


def test_sampling_failure_aborts_only_that_request(llm, request):
    good = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)]
    prompts = ["w70 w71", "w72 w73 w74"]
    alone = llm.generate(prompts, good)
    failing_seed = request.getfixturevalue("sampling_fails_for_seed")  # only after the reference run
    bad = SamplingParams(max_tokens=6, temperature=1.0, seed=failing_seed, ignore_eos=True)
    outs = llm.generate([prompts[0], "w75 w76", prompts[1]], [good[0], bad, good[1]])
    assert outs[1].finish_reason == "abort"
    assert "boom" in outs[1].error and outs[1].token_ids == []
    for o, ref in zip((outs[0], outs[2]), alone):
        assert o.error is None and o.finish_reason == "length"
        assert o.token_ids == ref.token_ids
    _assert_clean(llm)
    assert llm.generate(prompts, good)[1].token_ids == alone[1].token_ids  # the engine still serves


def test_detokenization_failure_aborts_only_that_request(llm, monkeypatch):
    engine = llm.engine
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    ref = llm.generate(["w80 w81"], p)[0]
    ok = engine.add_request("w80 w81", p)
    bad = engine.add_request("w82 w83", p)

    def boom(ids):
        raise RuntimeError("cannot decode")

    monkeypatch.setattr(engine.outputs._tracked[bad].detok, "add", boom)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert done[bad].finish_reason == "abort" and "cannot decode" in done[bad].error
    assert done[ok].error is None and done[ok].token_ids == ref.token_ids and done[ok].text == ref.text
    _assert_clean(llm)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_min_tokens_masks_stop_tokens_until_reached(llm, temperature):
    """Stop tokens (and EOS) cannot even be sampled before min_tokens, as in vLLM: not merely ignored."""
    prompt = [5, 6, 7, 8, 9]
    first = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=temperature, seed=3))[0].token_ids[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=temperature, seed=3, min_tokens=4,
                                              stop_token_ids=[first]))[0]
    assert first not in out.token_ids[:4] and len(out.token_ids) >= 4
    assert out.finish_reason == "length" or out.token_ids[-1] == first or out.token_ids[-1] == 2


def test_sampler_masks_stop_ids_per_row():
    logits = torch.zeros(2, 10)
    logits[:, 2] = 5.0                                    # "EOS" is everyone's favourite
    masked = sampler.make_sample_state(SamplingParams(max_tokens=4, min_tokens=2, temperature=0), torch.device("cpu"),
                                       (2,))
    free = sampler.make_sample_state(SamplingParams(max_tokens=4, temperature=0), torch.device("cpu"), (2,))
    for step in range(3):
        tokens, _ = sampler.sample(logits, [masked, free])
        assert tokens[1] == 2
        assert (tokens[0] != 2) if step < 2 else (tokens[0] == 2)
    assert logits[0, 2] == 5.0                             # the caller's logits are left alone


def _state(**kw):
    vocab = kw.pop("vocab", 4)
    prompt = kw.pop("prompt", None)
    return sampler.make_sample_state(SamplingParams(max_tokens=8, **kw), torch.device("cpu"), (), prompt, vocab)


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert sampler.sample(logits, [_state(temperature=0, logit_bias={3: 100.0})])[0] == [3]
    assert sampler.sample(logits, [_state(temperature=0, logit_bias={0: -100.0})])[0] == [1]
    draws = {sampler.sample(logits, [_state(temperature=1.0, seed=s, logit_bias={0: -100, 1: -100, 2: -100})])[0][0]
             for s in range(20)}
    assert draws == {3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[5.0, 3.0, -1.0, -2.0]])
    st = _state(temperature=0, repetition_penalty=10.0, prompt=[0, 3])
    row = logits[0].clone()
    st.process(row)
    assert row.tolist() == [0.5, 3.0, -1.0, -20.0]
    assert sampler.sample(logits, [st])[0] == [1]


def test_frequency_and_presence_penalties_follow_the_generated_counts():
    logits = torch.tensor([[1.0, 0.9, 0.0, 0.0]])
    freq = _state(temperature=0, frequency_penalty=0.5)
    assert [sampler.sample(logits, [freq])[0][0] for _ in range(4)] == [0, 1, 0, 1]
    row = logits[0].clone()
    freq.process(row)                                  # 0 and 1 generated twice each: -2 * 0.5
    assert row.tolist() == pytest.approx([0.0, -0.1, 0.0, 0.0])
    pres = _state(temperature=0, presence_penalty=2.0)
    assert [sampler.sample(logits, [pres])[0][0] for _ in range(3)] == [0, 1, 2]


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    seen_07 = {sampler.sample(logits, [_state(temperature=1.0, seed=s, min_p=0.7)])[0][0] for s in range(30)}
    seen_05 = {sampler.sample(logits, [_state(temperature=1.0, seed=s, min_p=0.5)])[0][0] for s in range(60)}
    assert seen_07 == {0} and seen_05 == {0, 1}


def test_penalized_seeded_runs_are_reproducible_whatever_the_batch(llm):
    p = SamplingParams(max_tokens=10, temperature=0.9, seed=7, ignore_eos=True, presence_penalty=0.5,
                       frequency_penalty=0.3, repetition_penalty=1.3, min_p=0.05, logit_bias={5: 3.0})
    alone = llm.generate(["w10 w11 w12"], p)[0].token_ids
    other = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    assert llm.generate(["w3 w4", "w10 w11 w12"], [other, p])[1].token_ids == alone
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=2.0)
    out = llm.generate(["w10 w11 w12"], greedy)[0].token_ids
    plain = llm.generate(["w10 w11 w12"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    assert out != plain or len(set(plain)) == len(plain)


def test_top_p_below_float32_resolution_keeps_the_best_token():
    logits = torch.tensor([[0.1, 2.0, 0.3, 0.0]])
    for seed in range(5):
        assert sampler.sample(logits, [_state(temperature=1.0, top_p=1e-300, seed=seed)])[0] == [1]


def test_logprobs_stay_finite_when_logits_are_masked():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    st = sampler.make_sample_state(SamplingParams(max_tokens=4, min_tokens=2, temperature=0, logprobs=4,
                                                  logit_bias={1: -100.0}), torch.device("cpu"), (0,), None, 4)
    _, lps = sampler.sample(logits, [st])
    values = [lps[0].logprob] + [v for _, v in lps[0].top]
    assert all(v == v and -9999.0 <= v <= 0 for v in values) and -9999.0 in values


def test_repetition_penalty_and_min_p_match_transformers_processors():
    """Reference implementations: transformers' RepetitionPenaltyLogitsProcessor (over prompt + output ids) and
    MinPLogitsWarper, on random logits."""
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    vocab = 50
    for r in (0.5, 1.3, 2.0):
        logits = torch.randn(1, vocab, generator=g) * 4
        prompt = torch.randint(0, vocab, (12,), generator=g).tolist()
        st = _state(temperature=0, repetition_penalty=r, prompt=prompt, vocab=vocab)
        for t in (3, 7):
            st.record(t)
        ours = logits[0].clone()
        st.process(ours)
        ref = RepetitionPenaltyLogitsProcessor(r)(torch.tensor([prompt + [3, 7]]), logits.clone())[0]
        assert torch.allclose(ours, ref)
    for min_p in (0.05, 0.3):
        logits = torch.randn(1, vocab, generator=g) * 3
        kept_ref = torch.isfinite(MinPLogitsWarper(min_p)(None, logits.clone()))[0]
        seen = {sampler.sample(logits, [_state(temperature=1.0, seed=s, min_p=min_p, vocab=vocab)])[0][0]
                for s in range(300)}
        assert seen <= set(torch.nonzero(kept_ref).flatten().tolist())


def test_stop_strings_wait_for_min_tokens(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = llm.generate(["w20 w21"], greedy)[0]
    first_word = ref.text.split()[0]
    cut = llm.generate(["w20 w21"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                   stop=[first_word]))[0]
    assert cut.finish_reason == "stop" and cut.text.strip() == ""
    late = llm.generate(["w20 w21"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, min_tokens=3,
                                                    stop=[first_word]))[0]
    assert len(late.token_ids) >= 3   # no stop check before min_tokens, as in vLLM

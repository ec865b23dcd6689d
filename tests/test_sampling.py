"""Sampling: seeds, stop strings and ids, logprobs, chat, text output."""

from __future__ import annotations

import pytest

from tokenyard import LLM, SamplingParams


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

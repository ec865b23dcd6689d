"""Shared fixtures: tiny seeded random models saved as real Hugging Face directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU, Triton kernels can only run in Triton's interpreter, and Triton reads this when it is first
# imported (other libraries may import it before the device-path tests do).
if not _cuda_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_VOCAB = 256


def _tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, TINY_VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    fast.save_pretrained(str(path))


def make_tiny_model(path: Path, kind: str, seed: int = 0, max_positions: int = 256) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif kind == "llama-biases":   # attention_bias (q, k, v and o) and mlp_bias, all non-zero
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True,
                                             mlp_bias=True))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.2)
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
        with torch.no_grad():  # make the qkv biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    else:
        raise ValueError(kind)
    model.save_pretrained(str(path), safe_serialization=True)
    _tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-only"), "llama")


FAILING_SEED = 666


@pytest.fixture
def sampling_fails_for_seed(monkeypatch) -> int:
    """Make sampling raise ``RuntimeError("boom")`` for requests with seed FAILING_SEED; returns that seed."""
    from tokenyard.engine import sampler

    real = sampler._sample_row

    def flaky(row, s):
        if s.params.seed == FAILING_SEED:
            raise RuntimeError("boom")
        return real(row, s)

    monkeypatch.setattr(sampler, "_sample_row", flaky)
    return FAILING_SEED

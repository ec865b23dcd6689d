"""Hugging Face transformers greedy decoding, the reference tokenyard must match token for token."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=4)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    from tokenyard.model.loader import ensure_hf_weights

    ensure_hf_weights(Path(path))   # a converted GGUF keeps only its quantized file until fp32 is asked for
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # the reference runs to max_new_tokens
    return model


def hf_greedy(path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` for one prompt, never stopping early at EOS."""
    model = hf_model(str(path))
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None,
        )
    return out[0, len(prompt_ids):].tolist()

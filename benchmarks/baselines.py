"""Measurement pieces the offline benchmarks share: transformers ``generate`` in static, left-padded batches
(the baseline a user of transformers would run), and a single stream timed through a tokenyard engine."""

from __future__ import annotations

import time

import torch


class StaticBatchGenerator:
    """Greedy ``generate`` of a loaded transformers model over left-padded batches, EOS ignored."""

    def __init__(self, model, device: str = "cpu", pad: int = 0) -> None:
        self.model = model
        self.device = device
        self.pad = pad
        model.generation_config.eos_token_id = None

    def generate(self, batch: list[list[int]], max_new: int) -> list[list[int]]:
        """The new tokens of each prompt."""
        width = max(map(len, batch))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=self.pad, eos_token_id=None, temperature=None, top_p=None,
                                      top_k=None)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out[:, width:].tolist()

    def single_stream(self, prompt: list[int], max_new: int) -> dict:
        """TTFT (a 1-token generate) and decode tok/s of one prompt, after a warm-up."""
        self.generate([prompt[:32]], 4)
        t = time.perf_counter()
        self.generate([prompt], 1)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        n = len(self.generate([prompt], max_new)[0])
        total = time.perf_counter() - t
        return {"ttft_s": ttft, "decode_tok_s": (n - 1) / max(total - ttft, 1e-9), "tokens": n}


def tokenyard_single_stream(engine, prompt: list[int], params) -> dict:
    """TTFT and decode tok/s of one request alone in a tokenyard ``LLMEngine``, stepping it to the end."""
    engine.add_request(prompt, params)
    start = time.perf_counter()
    stamps = []
    while engine.has_unfinished_requests():
        if engine.step():
            stamps.append(time.perf_counter())
    return {"ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "tokens": len(stamps)}

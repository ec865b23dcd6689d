"""Prompt text of exactly N tokens for the served model's tokenizer, and the request bodies that carry it.

Text is random words from the vocabulary (tokens that decode to a plain alphanumeric word), decoded and
re-encoded until the encoding has exactly N tokens: a re-encoding that comes out long is cut to N tokens,
one that comes out short gets more random words, and the loop repeats until it is stable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_tokenizer(path: str | Path | None):
    """A transformers tokenizer from an HF directory; the bundled model's converted directory by default."""
    from transformers import AutoTokenizer

    if path is None:
        from tokenyard.model.loader import resolve_model

        path = resolve_model(None).hf_dir
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"--tokenizer: {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - any load failure is the user's path
        raise ValueError(f"--tokenizer: cannot load a tokenizer from {p}: {e}") from None


class PromptBuilder:
    MAX_TRIES = 50

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        special = set(tokenizer.all_special_ids or ())
        ids = [i for i in range(len(tokenizer)) if i not in special]
        words = tokenizer.batch_decode([[i] for i in ids])
        plain = [i for i, w in zip(ids, words) if w.strip().isascii() and w.strip().isalnum()]
        self.words = np.asarray(plain if len(plain) >= 16 else ids)
        # Tokens the tokenizer adds around any text (a BOS, say): counted in N, but not part of the words.
        self.num_special = len(tokenizer.encode(""))
        self._chat_overhead: int | None = None

    def count(self, text: str) -> int:
        """Tokens the server will see for this completions prompt (it encodes with special tokens)."""
        return len(self.tok.encode(text))

    def text(self, n: int, rng: np.random.Generator) -> str:
        """A prompt that encodes to exactly n tokens."""
        target = n - self.num_special
        if target < 1:
            raise ValueError(f"cannot build a prompt of {n} token(s): the tokenizer adds {self.num_special} "
                             "special token(s) to any text")
        for _ in range(self.MAX_TRIES):
            ids = rng.choice(self.words, size=target).tolist()
            for _ in range(8):
                text = self.tok.decode(ids)
                enc = self.tok.encode(text, add_special_tokens=False)
                if len(enc) == target and self.count(text) == n:
                    return text
                if len(enc) > target:
                    ids = enc[:target]
                else:
                    ids = enc + rng.choice(self.words, size=target - len(enc)).tolist()
        raise RuntimeError(f"could not build a prompt of exactly {n} tokens in {self.MAX_TRIES} tries")

    def chat_overhead(self) -> int:
        """Tokens a chat template adds around one user message's content."""
        if self._chat_overhead is None:
            content = self.text(max(8, self.num_special + 1), np.random.default_rng(0))
            try:
                whole = self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - no chat template: the server will say so per request
                self._chat_overhead = 0
                return 0
            self._chat_overhead = max(0, len(self.tok.encode(whole, add_special_tokens=False))
                                      - len(self.tok.encode(content, add_special_tokens=False)))
        return self._chat_overhead


def request_body(endpoint: str, model: str | None, prompt: str | list[dict], max_tokens: int, ignore_eos: bool,
                 tenant: str | None = None, priority: int | None = None) -> dict:
    """A streaming /v1/completions or /v1/chat/completions body (``prompt`` is the messages for chat)."""
    body: dict = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                  "temperature": 0.0}
    if model is not None:
        body["model"] = model
    if endpoint == "chat":
        body["messages"] = prompt
    else:
        body["prompt"] = prompt
    if ignore_eos:
        body["ignore_eos"] = True
    if tenant is not None:
        body["user"] = tenant
    if priority is not None:
        body["priority"] = priority
    return body

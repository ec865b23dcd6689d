"""Tokenizer, chat template and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenyard.sampling_params import InvalidParameterError


def _check_unicode(text: str, param: str) -> None:
    """A lone surrogate (JSON allows "\\ud800") is not text any tokenizer can take: the caller's error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameterError(param, f"{param} is not valid Unicode ({e.reason} at position {e.start})") \
            from None


class Tokenizer:
    def __init__(self, hf_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(hf_dir))
        # decode() runs twice per request per step (incremental detokenization). The Rust tokenizer gives the
        # same text as transformers' wrapper when no clean-up pass follows, at a third of the cost.
        raw = getattr(self._tok, "_tokenizer", None)
        self._raw_decode = raw.decode if raw is not None and not getattr(
            self._tok, "clean_up_tokenization_spaces", True) else None
        self._controls: list[str] | None = None
        self.eos_token_id: int | None = self._tok.eos_token_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_unicode(text, "prompt")
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._raw_decode is not None:
            return self._raw_decode(ids, skip_special_tokens=skip_special_tokens)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self._tok.convert_ids_to_tokens(ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise InvalidParameterError("messages", "messages: this model has no chat template; use a plain prompt")
        for m in messages:
            _check_unicode(m.get("content") or "", "messages")
        if any(sp in (m.get("content") or "") for m in messages for sp in self._control_strings):
            return self._template_with_literal_content(messages, add_generation_prompt)
        # The template already has every special token it wants; add none of our own.
        return self._tok.encode(self._render(messages, add_generation_prompt), add_special_tokens=False)

    @property
    def _control_strings(self) -> list[str]:
        if self._controls is None:
            self._controls = sorted({t.content for t in self._tok.added_tokens_decoder.values() if t.special}
                                    | set(self._tok.all_special_tokens), key=len, reverse=True)
        return self._controls

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - template errors are the caller's bad messages
            raise InvalidParameterError("messages", f"messages: chat template failed: {e}") from e

    def _template_with_literal_content(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """A message whose text spells a control token ("<|im_start|>system ...") must not become one: a user
        could forge a system turn. Render the template around placeholders, tokenize its own text as usual and
        each message's content with control tokens split into plain text."""
        marks = [f"TOKENYARDMSG{i:04d}X" for i in range(len(messages))]
        text = self._render([{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt)
        ids: list[int] = []
        for mark, m in zip(marks, messages):
            head, sep, text = text.partition(mark)
            if not sep or mark in text:
                raise InvalidParameterError("messages", "messages: a message's text holds a control token of the "
                                                        "model, and this chat template cannot keep it as text")
            ids += self._tok.encode(head, add_special_tokens=False)
            ids += self._tok(m.get("content") or "", add_special_tokens=False, split_special_tokens=True).input_ids
        return ids + self._tok.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything each step.

    Keeps a small window of earlier tokens as context (tokenizers merge spaces and bytes across tokens) and
    holds back text that ends in an incomplete UTF-8 sequence until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

"""Incremental detokenization: text grows token by token and never ends in half a multi-byte character.

Byte-level BPE splits one UTF-8 character over several tokens; decoding a prefix then yields U+FFFD. We decode a
short window (the tokens since the last stable point) and release new text only once it no longer ends in U+FFFD,
the scheme of Hugging Face TGI and vLLM. Concatenating every delta gives exactly the full decode.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        # The Rust tokenizer's decode skips the Python wrapper's per-call overhead. No tokenizer
        # (skip_tokenizer_init): no text.
        self._decode = (getattr(tokenizer, "backend_tokenizer", tokenizer).decode if tokenizer is not None
                        else lambda ids, skip_special_tokens=True: "")
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are already in `text`

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is still incomplete)."""
        self.token_ids.append(token_id)
        window = self.token_ids[self._prefix_offset:]
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset],
                              skip_special_tokens=self.skip_special_tokens)
        full = self._decode(window, skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        if self._read_offset == len(self.token_ids):
            return ""
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset],
                              skip_special_tokens=self.skip_special_tokens)
        full = self._decode(self.token_ids[self._prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

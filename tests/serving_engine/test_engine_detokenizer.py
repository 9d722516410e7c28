"""Incremental detokenization never emits half a multi-byte character, and its deltas add up to the full text."""
from __future__ import annotations

from transformers import AutoTokenizer

from serving.engine.detokenizer import IncrementalDetokenizer

TEXT = "Café naïve — 日本語のテキスト, emoji 🙂🚀 and Ελληνικά; done."


def test_multibyte_characters_are_never_split(maverick_tiny):
    tok = AutoTokenizer.from_pretrained(str(maverick_tiny))
    ids = tok.encode(TEXT, add_special_tokens=False)
    single = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in single), "the BPE should split some characters over several tokens"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # held back while a character was incomplete
    assert "".join(deltas) + detok.flush() == TEXT == detok.text


def test_special_tokens_are_skipped_and_flush_releases_a_dangling_byte(maverick_tiny):
    tok = AutoTokenizer.from_pretrained(str(maverick_tiny))
    eot = tok.convert_tokens_to_ids("<|eot|>")
    ids = tok.encode("ok 🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add(i) for i in ids + [eot])
    assert text == "ok 🙂"
    partial = IncrementalDetokenizer(tok)
    emoji = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji) > 1
    assert partial.add(emoji[0]) == ""
    assert partial.flush() == "\ufffd"  # an unfinished character at the very end shows as the replacement mark

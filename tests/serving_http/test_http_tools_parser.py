"""The Llama 4 tool-call parser (serving/api/tools.py), both forms: JSON and pythonic. No server: strings, then
the real tokenizer of the tiny checkpoint for the special tokens and for streaming (streamed == whole, any split).
"""
from __future__ import annotations

import json

import pytest

from serving.api.tools import END, START, ToolStreamParser, ToolText, parse_tool_calls

NAMES = {"get_weather", "get_time", "search"}


def calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


CASES = [
    # (id, output text, content, calls)
    ("json-bare", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("json-preamble", 'Let me look that up.\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}',
     "Let me look that up.", [("get_weather", {"city": "Paris"})]),
    ("json-block", f'Sure. {START}{{"name": "get_time", "parameters": {{"tz": "CET"}}}}{END}', "Sure.",
     [("get_time", {"tz": "CET"})]),
    ("json-after-block", f'{START}{END}{{"name": "get_time", "parameters": {{"tz": "CET"}}}}', None,
     [("get_time", {"tz": "CET"})]),
    ("json-nested", '{"name": "search", "parameters": {"q": "llamas", "filters": [[1, 2], {"a": [true, null]}], '
     '"n": -3.5e2}}', None, [("search", {"q": "llamas", "filters": [[1, 2], {"a": [True, None]}], "n": -350.0})]),
    ("json-several", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
     '"parameters": {"tz": "CET"}}', None, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    ("json-list", '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]',
     None, [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ("json-unicode", '{"name": "get_weather", "parameters": {"city": "Zürich 東京 \\"quoted\\" 🦙"}}', None,
     [("get_weather", {"city": 'Zürich 東京 "quoted" 🦙'})]),
    ("json-arguments-key", '{"name": "get_time", "arguments": {"tz": "UTC"}}', None, [("get_time", {"tz": "UTC"})]),
    ("py-bare", '[get_weather(city="Paris"), get_time(tz="CET")]', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    ("py-preamble", 'I will check both.\n[get_weather(city="Paris")]', "I will check both.",
     [("get_weather", {"city": "Paris"})]),
    ("py-block", f'{START}[search(q="a]b", filters=[[1, 2], {{"k": (3, 4)}}], exact=True, limit=None)]{END}', None,
     [("search", {"q": "a]b", "filters": [[1, 2], {"k": [3, 4]}], "exact": True, "limit": None})]),
    ("py-unicode-quotes", "[get_weather(city='Zürich \"old town\"', note=\"it's 🦙\")]", None,
     [("get_weather", {"city": 'Zürich "old town"', "note": "it's 🦙"})]),
    ("py-call-in-block", f'{START}get_time(tz="CET"){END}', None, [("get_time", {"tz": "CET"})]),
    ("text-after", 'Checking.\n{"name": "get_time", "parameters": {"tz": "CET"}}\nDone.', "Checking.\n\nDone.",
     [("get_time", {"tz": "CET"})]),
    # malformed: left as content, verbatim
    ("json-malformed", '{"name": "get_weather", "parameters": {"city": "Paris"}', 
     '{"name": "get_weather", "parameters": {"city": "Paris"}', []),
    ("json-unknown-tool", '{"name": "rm_rf", "parameters": {}}', '{"name": "rm_rf", "parameters": {}}', []),
    ("py-malformed", '[get_weather(city="Paris"]', '[get_weather(city="Paris"]', []),
    ("py-positional", '[get_weather("Paris")]', '[get_weather("Paris")]', []),
    ("block-malformed", f'{START}get_weather(city=Paris{END}', "get_weather(city=Paris", []),
    ("prose-brackets", 'A list [1, 2] and a set {x}; {"name": "Bob"} is a person.',
     'A list [1, 2] and a set {x}; {"name": "Bob"} is a person.', []),
]


@pytest.mark.parametrize("text, content, want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse(text, content, want):
    got = parse_tool_calls(text, NAMES)
    assert calls(got) == want
    assert got.content == (content if content is not None else (None if want else ""))


@pytest.fixture(scope="module")
def tokenizer(scout_tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(scout_tiny))


def _ids(tok, text: str) -> list[int]:
    """Token ids for a parser string: the markers become the real special tokens."""
    start, end = tok.convert_tokens_to_ids("<|python_start|>"), tok.convert_tokens_to_ids("<|python_end|>")
    out = []
    for part in text.replace(END, "\x00E\x00").replace(START, "\x00S\x00").split("\x00"):
        out.extend([start] if part == "S" else [end] if part == "E" else tok.encode(part, add_special_tokens=False))
    return out + [tok.convert_tokens_to_ids("<|eom|>")]


@pytest.mark.parametrize("text, content, want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_special_tokens_and_streaming_equal_the_whole(tokenizer, text, content, want):
    ids = _ids(tokenizer, text)
    whole = parse_tool_calls(ToolText(tokenizer).text(ids), NAMES)
    assert calls(whole) == want  # the parser sees <|python_start|> although decoding skips special tokens
    for step in (1, 3):
        p = ToolStreamParser(tokenizer, NAMES)
        sent = "".join(p.feed(ids[k:k + step]) for k in range(0, len(ids), step))
        rest, streamed = p.finish()
        assert (sent + rest) == (whole.content or "")
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in whole.calls]


def test_streaming_sends_plain_text_early(tokenizer):
    p = ToolStreamParser(tokenizer, NAMES)
    ids = tokenizer.encode("The herd grazes on the hill [1, 2]", add_special_tokens=False)
    sent = "".join(p.feed([t]) for t in ids)
    assert sent == "The herd grazes on the hill [1, 2]"


def test_stop_strings_end_the_content_as_the_engine_ends_the_text(tokenizer):
    text = 'Sure thing. END {"name": "get_time", "parameters": {"tz": "CET"}}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    p = ToolStreamParser(tokenizer, NAMES, stop=["END"])
    sent = "".join(p.feed([t]) for t in ids)
    rest, found = p.finish()
    assert sent + rest == "Sure thing. " and found == []
    assert "E" not in sent  # a possible stop string's start is held back while streaming

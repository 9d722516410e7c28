"""Llama 4 tool calls: the model's output (token ids) -> OpenAI `tool_calls` plus the text around them as content.

Llama 4 writes calls in two forms, both recognised here:
  - JSON: `{"name": "get_weather", "parameters": {"city": "Paris"}}` (what herd's chat template asks for), one or
    several (separated by `;`, `,` or whitespace, or as a JSON list), bare or inside
    `<|python_start|>...<|python_end|>` (the released template renders past calls as
    `<|python_start|><|python_end|>{"name": ...}`, so calls right after the block count too);
  - pythonic (vLLM's `llama4_pythonic` template): `[get_weather(city="Paris"), get_time(tz="CET")]`, arguments as
    Python literals (nested lists and dicts, strings with quotes, unicode, numbers, True/False/None).
The special tokens come from the token ids (they are special, so the detokenized text never shows them): each
`<|python_start|>` / `<|python_end|>` becomes a private-use marker character in the string the parser reads.
Text before, between and after calls stays content; anything that does not parse as a call of a declared tool
(malformed JSON, unknown function, positional arguments) stays content, verbatim.

Streaming (`ToolStreamParser`): content is sent as it arrives until something that could begin a call (a
`<|python_start|>`, or a `{` / `[` whose next characters can still start one); from there the text is held, and
at the end the whole output is parsed exactly as a non-streamed answer is, so streamed and non-streamed answers
are equal. Held text that can no longer start a call is released at once.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass

START, END = "\ue000", "\ue001"  # <|python_start|>, <|python_end|> in the parsed string
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_PY_CALL_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\s*\(")
_JSON_KEYS = ('"name"', '"type"')
_SEPARATORS = " \t\r\n;,"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def openai(self, call_id: str | None = None) -> dict:
        return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    content: str | None  # None when the answer is only calls
    calls: list[ToolCall]


# ---- the whole output ---------------------------------------------------------------------------------------

def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> Parsed:
    """Split a decoded output (START/END markers for the python tokens) into content and calls."""
    content: list[str] = []
    calls: list[ToolCall] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == START:
            j = text.find(END, i + 1)
            block = text[i + 1:] if j < 0 else text[i + 1:j]
            i = n if j < 0 else j + 1
            found = _calls_in_block(block, tool_names)
            if found is None:
                content.append(block)
            else:
                calls.extend(found)
            continue
        if text[i] == END:
            i += 1
            continue
        if text[i] in "{[" and viable(text[i:]) is not False:
            got = _calls_at(text, i, tool_names)
            if got is not None:
                found, i = got
                calls.extend(found)
                continue
        content.append(text[i])
        i += 1
    out = "".join(content)
    if calls:
        out = out.rstrip()
    return Parsed(out or (None if calls else ""), calls)


def _calls_in_block(block: str, names) -> list[ToolCall] | None:
    """Inside <|python_start|>...<|python_end|>: the whole block must be calls (either form), or nothing parses."""
    s = block.strip()
    if not s:
        return []
    if s[0] in "{[":
        got = _calls_at(s, 0, names)
        if got is not None and not s[got[1]:].strip(_SEPARATORS):
            return got[0]
    return _pythonic(s, names)  # a bare `f(x=1)` or `f(x=1), g()` also counts inside the block


def _calls_at(text: str, i: int, names) -> tuple[list[ToolCall], int] | None:
    """Calls starting at text[i] ('{' or '['); returns them and where they end, or None."""
    dec = json.JSONDecoder()
    if text[i] == "[":
        try:
            value, end = dec.raw_decode(text, i)
        except ValueError:
            value = None
        if isinstance(value, list) and value:
            calls = [_json_call(v, names) for v in value]
            return (calls, end) if all(calls) else None
        # pythonic list: try each closing bracket in turn
        for j in _closing_brackets(text, i):
            calls = _pythonic(text[i:j + 1], names)
            if calls:
                return calls, j + 1
        return None
    calls, end = [], i
    while True:
        try:
            value, stop = dec.raw_decode(text, end)
        except ValueError:
            break
        call = _json_call(value, names)
        if call is None:
            break
        calls.append(call)
        end = stop
        k = end
        while k < len(text) and text[k] in _SEPARATORS:
            k += 1
        if k >= len(text) or text[k] != "{":
            break
        end = k
    return (calls, end) if calls else None


def _json_call(value, names) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if set(value) - {"name", "parameters", "arguments", "type"}:
        return None
    args = value.get("parameters", value.get("arguments", {}))
    if isinstance(args, str):  # arguments sent as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict) or (names is not None and value["name"] not in names):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


def _pythonic(s: str, names) -> list[ToolCall] | None:
    try:
        tree = ast.parse(s.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted(node.func)
        if name is None or (names is not None and name not in names):
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, SyntaxError, TypeError):
            return None
        if None in args:  # **kwargs
            return None
        try:
            calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        except (TypeError, ValueError):  # sets, bytes, complex numbers: not JSON
            return None
    return calls or None


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _closing_brackets(text: str, i: int):
    """Indices of the ']' that could close the '[' at i (skipping brackets inside string literals)."""
    depth, quote, k = 0, None, i
    while k < len(text):
        c = text[k]
        if quote:
            if c == "\\":
                k += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "[({":
            depth += 1
        elif c in "])}":
            depth -= 1
            if depth == 0:
                if c == "]":
                    yield k
                return
        k += 1


def viable(s: str) -> bool | None:
    """Could a call start at s[0] ('{' or '[')? True, False, or None (too little text to tell yet)."""
    rest = s[1:].lstrip()
    if s[0] == "{":
        if not rest:
            return None
        if any(k.startswith(rest) for k in _JSON_KEYS):
            return None
        return any(rest.startswith(k) for k in _JSON_KEYS)
    if s[0] == "[":
        if not rest:
            return None
        if rest[0] == "{":
            return viable(rest)
        m = _IDENT.match(rest)
        if m is None:
            return False
        after = rest[m.end():].lstrip()
        if not after:
            return None
        return after[0] == "("
    return False


# ---- token ids -> the parsed string -----------------------------------------------------------------------

class ToolText:
    """Decodes token ids to the string `parse_tool_calls` reads: text, with markers for the python tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start_id = tokenizer.convert_tokens_to_ids(PYTHON_START)
        self.end_id = tokenizer.convert_tokens_to_ids(PYTHON_END)

    def text(self, ids: list[int]) -> str:
        out, run = [], []
        for t in ids:
            if t in (self.start_id, self.end_id):
                out.append(self._decode(run))
                out.append(START if t == self.start_id else END)
                run = []
            else:
                run.append(t)
        out.append(self._decode(run))
        return "".join(out)

    def _decode(self, ids: list[int]) -> str:
        return _clean(self.tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""


def _clean(text: str) -> str:
    """Generated text never carries the marker characters themselves."""
    return text.replace(START, "\ufffd").replace(END, "\ufffd")


class ToolStreamParser:
    """Incremental: `feed(new ids)` -> content safe to send now; `finish()` -> (remaining content, calls).

    Text is decoded incrementally (each token once; a run of ordinary tokens through the engine's incremental
    detokenizer, restarted at every python marker), so a long answer costs linear time on the replica's loop.
    """

    def __init__(self, tokenizer, tool_names: set[str] | None = None, stop: list[str] | None = None):
        from serving.engine.detokenizer import IncrementalDetokenizer

        self.stop = [x for x in stop or () if x]  # the engine ends at a stop string; the text does too

        self._new_run = lambda: IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.decoder = ToolText(tokenizer)
        self.names = tool_names
        self.ids: list[int] = []
        self._done = ""  # decoded text up to the last python marker (included)
        self._run = self._new_run()
        self.sent = ""  # content sent so far
        self.pos = 0  # index in the parsed string up to which content was sent
        self.hold: int | None = None  # where a possible call begins

    def _text(self, new_ids: list[int]) -> str:
        for t in new_ids:
            if t in (self.decoder.start_id, self.decoder.end_id):
                self._done += _clean(self._run.text + self._run.flush()) + (START if t == self.decoder.start_id
                                                                            else END)
                self._run = self._new_run()
            else:
                self._run.add(t)
        return self._done + _clean(self._run.text)

    def _cut(self, s: str) -> tuple[str, bool]:
        """s up to the first stop string, and whether text may still grow into one (hold its possible start)."""
        hits = [i for i in (s.find(x) for x in self.stop) if i >= 0]
        if hits:
            return s[:min(hits)], False
        return s, bool(self.stop)

    def feed(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        s, open_end = self._cut(self._text(new_ids))
        if open_end:
            s = s[:max(self.pos, len(s) - max(len(x) for x in self.stop) + 1)]
        while True:
            if self.hold is not None:
                if s[self.hold] == START or viable(s[self.hold:]) is not False:
                    break
                self.hold = None  # it could not be a call after all: release it
            k = self._next_candidate(s, self.pos)
            if k is None:
                break
            self.hold = k
        end = len(s) if self.hold is None else self.hold
        piece = s[self.pos:end]
        stable = piece.rstrip()  # whitespace waits: it is dropped when a call follows
        delta = stable.replace(END, "")
        self.pos += len(stable)
        self.sent += delta
        return delta

    def _next_candidate(self, s: str, start: int) -> int | None:
        for k in range(start, len(s)):
            c = s[k]
            if c == START or (c in "{[" and viable(s[k:]) is not False):
                return k
        return None

    def finish(self) -> tuple[str, list[ToolCall]]:
        parsed = self.parsed()
        content = parsed.content or ""
        rest = content[len(self.sent):] if content.startswith(self.sent) else ""
        return rest, parsed.calls

    def parsed(self) -> Parsed:
        return parse_tool_calls(self._cut(self.decoder.text(self.ids))[0], self.names)

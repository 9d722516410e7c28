"""Structured output: grammars (JSON schema, any JSON object) enforced on the logits at every step, with xgrammar.

Why xgrammar: it is what vLLM and SGLang default to, it builds a token mask from a precompiled grammar in tens
of microseconds per row even with Llama 4's 202,048-token vocabulary, and it installs as a wheel beside herd's
torch 2.13.0 (pinned in pyproject.toml; llguidance would also do, but xgrammar also brings the JSON-schema
compiler and the bitmask kernel we need in one package).

`Grammars` (one per engine) compiles each distinct grammar once (an LRU cache keyed by the canonical schema text)
and hands every request a `GrammarState` (its own matcher). The engine's sampler (serving/engine/sampling.py)
calls `apply_grammar_masks` on a copy of the step's logits for the constrained rows only, so a batch mixes
constrained and free sequences, and under expert parallelism the mask is applied where sampling happens: in the
engine process, on the logits the workers return. When a grammar is complete only the end-of-turn tokens are
allowed, so a constrained answer always finishes with "stop".
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

from serving.engine.params import StructuredOutputsParams

# JSON-schema keywords the grammar enforces (or that only annotate). Anything else would be silently ignored by
# the grammar engine, so `check_json_schema` refuses it by name instead.
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
            "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "minLength", "maxLength",
            "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minProperties",
            "maxProperties"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "strict"}
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties")
CACHE_SIZE = 64

if TYPE_CHECKING:
    import torch


def check_json_schema(schema: Any, where: str = "schema") -> None:
    """Raise ValueError naming the first keyword the grammar cannot enforce (and where it is)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON object (a JSON schema), got {type(schema).__name__}")
    unknown = sorted(k for k in schema if k not in ENFORCED and k not in ANNOTATIONS)
    if unknown:
        raise ValueError(f"{where} uses JSON-schema keyword(s) {', '.join(repr(k) for k in unknown)} that herd's "
                         f"grammar engine cannot enforce; supported: {', '.join(sorted(ENFORCED))}")
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        raise ValueError(f"{where} combines 'pattern' with 'minLength'/'maxLength', which herd's grammar engine "
                         "cannot enforce together; put the length into the pattern (e.g. ^[a-z]{1,8}$)")
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_json_schema(sub, f"{where}.{key}.{name}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            check_json_schema(sub, f"{where}.{key}[{i}]")
    for key in _SCHEMA_ONE:
        if key in schema:
            check_json_schema(schema[key], f"{where}.{key}")


def json_schema_ebnf(schema: dict) -> str:
    """The grammar of a schema, as EBNF. No free whitespace (a random or weak model could pad forever). xgrammar
    0.2.8 lets raw control characters into length-bounded strings, which JSON forbids (json.loads and pydantic
    refuse the answer): its character class for them is narrowed to the one its unbounded strings use."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    return ebnf.replace(_BOUNDED_CHARS, _JSON_CHARS)


_BOUNDED_CHARS = r'[^\"\\\r\n]'
_JSON_CHARS = r'[^\0-\x1f\"\\\r\n]'


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token: int) -> None:
        """Advance past the chosen token (the mask allowed only tokens the grammar accepts)."""
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


class Grammars:
    """Compiles grammars for one tokenizer (once per distinct schema) and makes per-request states."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], cache_size: int = CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._compiler = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # requests are prepared on the caller's thread, several at once
        self.compiled = 0  # how many grammars were compiled (not served from the cache)

    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def warm(self) -> None:
        """Build the grammar engine's view of the vocabulary now (seconds with 202k tokens) rather than on the
        first constrained request; safe to run in a background thread."""
        with self._lock:
            self._get_compiler()

    def compile(self, spec: StructuredOutputsParams):
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            compiler = self._get_compiler()
            if spec.json_object:
                grammar = compiler.compile_builtin_json_grammar()
            else:
                check_json_schema(spec.json)
                try:
                    grammar = compiler.compile_grammar(json_schema_ebnf(spec.json))
                except Exception as e:  # xgrammar's own errors (bad $ref, invalid pattern...)
                    raise ValueError(f"the JSON schema cannot be compiled: {e}") from None
            self.compiled += 1
            self._cache[key] = grammar
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return grammar

    def new_state(self, spec: StructuredOutputsParams) -> GrammarState:
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(self.compile(spec)))


def apply_grammar_masks(logits_NV: torch.Tensor, grammars: Sequence[GrammarState | None],
                        rows: Sequence[int]) -> None:
    """Set to -inf, in place, every token the grammar of each row in `rows` forbids next."""
    import xgrammar as xgr

    V = logits_NV.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(grammars), V)
    for i in rows:
        grammars[i].matcher.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits_NV, bitmask.to(logits_NV.device), vocab_size=V, indices=list(rows))

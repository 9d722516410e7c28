"""`SamplingParams`: how to pick tokens and when to stop, with vLLM's field names and validation at construction."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

GREEDY_TEMPERATURE = 1e-5  # temperatures below this are greedy, as in vLLM (_SAMPLING_EPS)
MAX_N = 128  # samples per request (OpenAI's limit)


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed sample `index` of an n > 1 request draws with: seed + index (vLLM's rule), wrapped into the
    unsigned 64-bit range, so sample i equals a single request sent with that seed."""
    if seed is None or index == 0:
        return seed
    out = seed + index
    return out - 2 ** 64 if out >= 2 ** 64 else out


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's name): a JSON schema, or any JSON object. One of the two."""

    json: dict[str, Any] | None = None  # a JSON schema the output must validate against
    json_object: bool = False  # any JSON object

    def __post_init__(self) -> None:
        if (self.json is not None) == bool(self.json_object):
            raise ValueError("structured_outputs needs exactly one of json (a schema) or json_object=True")

    def key(self) -> str:
        """Identifies the grammar (compiled once per key)."""
        return "object" if self.json_object else "schema:" + json.dumps(self.json, sort_keys=True)


@dataclass
class SamplingParams:
    """Per-request sampling settings. Invalid values raise ValueError naming the field, the value and the rule."""

    n: int = 1  # samples of the prompt: computed once, its blocks shared; sample i uses seed + i (sample_seed)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    max_tokens: int | None = 16  # None: until the context is full
    stop: str | list[str] | None = None  # stop strings (not included in the text)
    stop_token_ids: list[int] | None = None  # stop on these ids as well as on the model's EOS ids
    ignore_eos: bool = False  # keep generating past EOS ids
    seed: int | None = None  # per-request seed: same seed, same tokens
    logprobs: int | None = None  # also return the top-n log-probabilities of each generated token (0: sampled only)
    prompt_logprobs: int | None = None  # log-probabilities of the prompt's tokens (top-n too); the first is None
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and output tokens
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the likeliest token's
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before anything else
    structured_outputs: StructuredOutputsParams | None = None  # grammar the output must follow
    skip_special_tokens: bool = True
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer from 1 to {MAX_N}, got {self.n!r}")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be 0 (or -1, no limit) or a positive integer, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.prompt_logprobs is not None and not (0 <= self.prompt_logprobs <= 20):
            raise ValueError(f"prompt_logprobs must be between 0 and 20, got {self.prompt_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logit_bias:
            for t, b in self.logit_bias.items():
                if not isinstance(t, int) or t < 0:
                    raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {t!r}")
                if not (-100.0 <= b <= 100.0):
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for token {t}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_list = stops
        if self.stop_token_ids is not None and any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        # vLLM's rule: a temperature this small is greedy (dividing logits by it overflows to inf/nan).
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        """Whether logits change before temperature (bias, penalties): the raw ones stay for logprobs."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 \
            or self.repetition_penalty != 1.0

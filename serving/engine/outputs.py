"""What the engine hands back: finished or partial results (`RequestOutput`), streaming deltas, and stats."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class Logprob:
    """Log-probability of one token under the model's distribution (before temperature/top-k/top-p)."""

    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str


# One generated position: token id -> Logprob, holding the sampled token and the top-n alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None for EOS/length)
    logprobs: list[PositionLogprobs] | None = None
    error: str | None = None  # set when finish_reason == "error"


@dataclass
class RequestMetrics:
    arrival_time: float  # time.time() when the request was added
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queued_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # per prompt token (the first is None)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass
class RequestDelta:
    """What one request gained since its previous delta (streaming); the last one carries finish_reason."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_generated_tokens: int
    logprobs: list[PositionLogprobs] | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    queued_time: float | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # in the first delta only, when asked for
    index: int = 0  # which sample (n > 1); each sample's deltas end with its own finish_reason
    finished: bool = False  # the last delta of the request: every sample has finished


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV-cache blocks held (the fuller of the two layer types' pools)
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int = 0  # running sequences whose blocks were freed for others, recomputed later
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens served from cached blocks
    kv_blocks_in_use: dict = None  # {"global": n, "chunked": m}
    prompt_tokens_computed: int = 0  # prompt tokens the model ran (prompt_tokens_total less prefix hits)

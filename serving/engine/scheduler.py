"""Continuous batching: which tokens of which requests run in the next step.

Every request is a list of token ids (prompt, then generated tokens) and a count of how many of them are already
in the KV cache; a step runs, for each scheduled request, the next piece of its uncomputed tokens. A decode is the
one-token case, prefill the long one, so both mix freely in one step (vLLM v1's formulation). Limits:
- at most `max_num_seqs` requests hold a KV slot (running); the rest wait in arrival order;
- at most `max_num_batched_tokens` tokens per step; running requests go first, so decodes are never starved by
  a long prompt, which is prefilled over several steps;
- a piece never crosses a multiple of `attention_chunk_size` (the model's chunked-attention ring needs it).
Requests join between steps and leave the moment they finish or are aborted (their slot is freed at once).
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.executor import SeqChunk
from serving.engine.outputs import PositionLogprobs, RequestMetrics
from serving.engine.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request's whole state inside the engine."""

    request_id: str
    seq_id: int  # the executor's key for the KV slot
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved (max_tokens or what the context leaves)
    metrics: RequestMetrics
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None  # seeded requests only
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0  # tokens whose keys/values are in the cache
    status: RequestStatus = RequestStatus.WAITING
    output_text: str = ""  # detokenized output, cut at a stop string
    logprobs: list[PositionLogprobs] | None = None
    grammar: Any = None  # structured.GrammarState when the output is constrained
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # scored prompt tokens (echo requests)
    images: list | None = None  # multimodal.RequestImage per image: tiles, patch positions, embeddings once made
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    # Streaming cursors: how much has been handed out already.
    sent_tokens: int = 0
    sent_text: int = 0
    sent_logprobs: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class ScheduledPiece:
    request: Request
    chunk: SeqChunk


class Scheduler:
    """Waiting queue + running set, and the per-step choice of pieces."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, chunk_size: int):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of whichever queue holds it (finish or abort)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def _piece(self, req: Request, budget: int) -> SeqChunk:
        start = req.num_computed
        to_boundary = self.chunk_size - start % self.chunk_size
        n = min(len(req.token_ids) - start, budget, to_boundary)
        if req.prompt_logprobs is not None and start < len(req.prompt_token_ids):
            # Every prompt position's logits are wanted and the executor returns a piece's last one: 1-token pieces.
            return SeqChunk(req.seq_id, req.token_ids[start:start + 1], start, need_logits=True)
        end = start + n
        return SeqChunk(req.seq_id, req.token_ids[start:end], start, need_logits=end == len(req.token_ids))

    def schedule(self) -> list[ScheduledPiece]:
        budget = self.max_num_batched_tokens
        out: list[ScheduledPiece] = []
        for req in self.running:
            if budget == 0:
                break
            piece = self._piece(req, budget)
            budget -= len(piece.token_ids)
            out.append(ScheduledPiece(req, piece))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            piece = self._piece(req, budget)
            budget -= len(piece.token_ids)
            out.append(ScheduledPiece(req, piece))
        return out

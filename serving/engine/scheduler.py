"""Continuous batching: which tokens of which requests run in the next step.

Every request is a list of token ids (prompt, then generated tokens) and a count of how many of them are already
in the KV cache; a step runs, for each scheduled request, the next piece of its uncomputed tokens. A decode is the
one-token case, prefill the long one, so both mix freely in one step (vLLM v1's formulation). Limits:
- at most `max_num_seqs` requests run at once, and only as many as the KV cache's free blocks hold
  (serving/engine/kv_cache.py): a waiting request is admitted when its first piece's blocks are free (its cached
  prefix is shared, not recomputed); when running requests need more blocks than are free, the newest is
  preempted (its blocks freed, its tokens recomputed later: vLLM's recompute policy) instead of failing;
- at most `max_num_batched_tokens` tokens per step; running requests go first, so decodes are never starved by
  a long prompt, which is prefilled over several steps;
- a piece never crosses a multiple of `attention_chunk_size` (the model's chunked-attention ring needs it).
Requests join between steps and leave the moment they finish or are aborted (their blocks are freed at once).
The samples of an n > 1 request other than the first join the running set without a prefill (`start_forked`):
the engine forks them from the first once its prompt is computed.
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


# Logits rows a step returns for scored prompts (echo + logprobs): each is a [vocab] float32 row (800 KB with Llama
# 4's 202,048 tokens), so a long prompt is scored over a few steps rather than holding them all at once.
SCORED_ROWS_PER_STEP = 256


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request's whole state inside the engine."""

    request_id: str
    seq_id: int  # the KV-cache manager's key for its blocks
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
    cache_key: bytes = b""  # mixed into its prefix-cache keys: cache_salt, tenant, image hashes
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    # n > 1: the request's samples. Each is a Request of its own (same request_id, `index` 0..n-1) and `group` is
    # the list of all of them; sample 0 computes the prompt, the others are `held` by it until its logits are out,
    # then fork from it (serving/engine/llm_engine.py).
    index: int = 0
    group: list["Request"] | None = None
    held: list["Request"] = field(default_factory=list)
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

    @property
    def samples(self) -> list["Request"]:
        return self.group or [self]

    @property
    def prompt_scored(self) -> bool:
        """Whether the prompt's log-probabilities, if wanted, are all known (so its blocks may come from cache)."""
        return self.prompt_logprobs is None or len(self.prompt_logprobs) >= len(self.prompt_token_ids)


@dataclass
class ScheduledPiece:
    request: Request
    chunk: SeqChunk


class Scheduler:
    """Waiting queue + running set, and the per-step choice of pieces and of the KV-cache blocks they use."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, chunk_size: int, kv):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size
        self.kv = kv  # serving.engine.kv_cache.KVCacheManager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0
        self._score_rows = SCORED_ROWS_PER_STEP  # left in this step (see _piece)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of whichever queue holds it (finish or abort) and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.seq_id)

    def start_forked(self, req: Request) -> bool:
        """Run a sample forked from a running one (its blocks already held); False when `max_num_seqs` run."""
        if len(self.running) >= self.max_num_seqs:
            return False
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return True

    def _piece(self, req: Request, budget: int) -> SeqChunk:
        start = req.num_computed
        to_boundary = self.chunk_size - start % self.chunk_size
        n = min(len(req.token_ids) - start, budget, to_boundary)
        if not req.prompt_scored and start < len(req.prompt_token_ids):
            # Every prompt position's logits are wanted (each scores the next prompt token): a piece asks for all
            # of its rows, so it stops at the prompt's end and at SCORED_ROWS_PER_STEP rows ([rows, vocab] floats).
            n = min(n, len(req.prompt_token_ids) - start, max(self._score_rows, 1))
            self._score_rows -= n
            return SeqChunk(req.seq_id, req.token_ids[start:start + n], start, need_logits=True, num_logits=n)
        end = start + n
        return SeqChunk(req.seq_id, req.token_ids[start:end], start, need_logits=end == len(req.token_ids))

    def _with_blocks(self, chunk: SeqChunk) -> SeqChunk:
        chunk.node, chunk.global_blocks, chunk.chunk_start, chunk.chunked_blocks = self.kv.tables(chunk.seq_id)
        chunk.block_copies = self.kv.pending_copies(chunk.seq_id)
        return chunk

    def _preempt(self, req: Request) -> None:
        """Free a running request's blocks; it waits at the front and recomputes its tokens (prompt and
        generated) when readmitted, most of them from the prefix cache if its blocks are still there."""
        self.running.remove(req)
        self.kv.free(req.seq_id)
        req.num_computed = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledPiece]:
        budget = self.max_num_batched_tokens
        self._score_rows = SCORED_ROWS_PER_STEP
        out: list[ScheduledPiece] = []
        preempted = False
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted below for an older request
                continue
            piece = self._piece(req, budget)
            while not self.kv.grow(req.seq_id, piece.start_pos + len(piece.token_ids)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    piece = None
                    break
            if piece is None:
                continue
            budget -= len(piece.token_ids)
            out.append(ScheduledPiece(req, self._with_blocks(piece)))
        # No admission in a step that had to preempt: memory is short, the running ones go first.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            hit = self.kv.admit(req.seq_id, req.token_ids, req.cache_key,
                                use_prefix=req.prompt_scored)  # prompts being scored are computed in full
            if hit is None:
                break
            req.num_computed = hit
            piece = self._piece(req, budget)
            if not self.kv.grow(req.seq_id, piece.start_pos + len(piece.token_ids)):
                self.kv.free(req.seq_id)
                req.num_computed = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= len(piece.token_ids)
            out.append(ScheduledPiece(req, self._with_blocks(piece)))
        return out

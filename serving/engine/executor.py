"""Executors run the model for the engine core: one step = a list of sequence chunks in, next-token logits out.

The engine (scheduler, sampling, detokenization) drives any object with the `Executor` interface; which one is
picked by `serving.build.build_executor`, outside this package. `LocalExecutor` runs `serving.model.Transformer`
in this process on one device; the expert-parallel executor (serving/expert_parallel/executor.py) runs the same
model sharded over Ray workers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llama4.config import TextConfig
from serving.engine.kv_cache import KVCachePlan, plan_kv_cache

log = logging.getLogger(__name__)


@dataclass
class SeqChunk:
    """One sequence's tokens to run this step."""

    seq_id: int
    token_ids: list[int]  # a prefill piece (never crossing an attention-chunk boundary) or one decode token
    start_pos: int  # absolute position of token_ids[0]
    need_logits: bool  # True when the last token's logits are needed (decode, or the last prefill piece)
    # The KV-cache blocks it reads and writes (serving/engine/kv_cache.py): on which node, the global layers'
    # table, and the chunked layers' table with the position its first block starts at.
    node: int = 0
    global_blocks: list[int] = field(default_factory=list)
    chunk_start: int = 0
    chunked_blocks: list[int] = field(default_factory=list)
    mm_embeds: tuple[list[int], torch.Tensor] | None = None  # image rows: (offsets in token_ids, [R, D] embeddings)
    # With need_logits: how many of its last positions' logits (more than 1 for a prompt whose log-probabilities
    # are asked for: each position's logits score the next prompt token).
    num_logits: int = 1
    # (kind, source, destination) blocks to copy on its node before the step: a forked sample's partial block
    block_copies: list[tuple[str, int, int]] = field(default_factory=list)


class Executor(Protocol):
    kv_plan: KVCachePlan  # each node's block pools (the engine's KVCacheManager hands their blocks out)
    num_nodes: int  # nodes with a cache of their own (1 in one process)

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """float32 logits [rows, V]: each need_logits chunk's last num_logits positions, in chunk order."""

    def routed_token_counts(self) -> torch.Tensor:
        """int64 [num_moe_layers, num_experts], cumulative."""

    def rebuild(self) -> None:
        """After a `WorkerDiedError`: replace what died and forget every sequence (the engine re-admits them)."""

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Runs the model in this process on one device, over its paged KV cache (blocks chosen by the engine)."""

    num_nodes = 1

    def __init__(self, model, plan: KVCachePlan):
        from serving.model import Transformer

        assert isinstance(model, Transformer)
        self.model = model
        self.cfg: TextConfig = model.cfg
        self.kv_plan = plan
        self.max_model_len = plan.max_model_len
        self.device = model.embed_tokens.weight.device
        self.workspace: dict = {}  # attention's gather buffers, kept across steps (serving.model.Batch.scratch)
        model.allocate_kv_cache(plan.global_blocks, plan.chunked_blocks, plan.block_size)
        log.info(plan.describe())

    @classmethod
    def from_config(cls, config) -> "LocalExecutor":
        """Load the model named by a `serving.config.EngineConfig` and size its cache."""
        from serving.loader import load_shard, open_reader, resolve_dtype

        m, c = config.model, config.cache
        plan = plan_kv_cache(m.text, c.max_model_len, resolve_dtype(m.dtype), config.scheduler.max_num_seqs,
                             c.kv_cache_memory_bytes, block_size=c.block_size,
                             mean_sequence_tokens=c.mean_sequence_tokens)
        reader = open_reader(m.weights_source, lora_adapter=m.lora_adapter)
        try:
            model = load_shard(m.text, reader, dtype=m.dtype, device=m.device)
        finally:
            reader.close()
        return cls(model, plan)

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        from serving.model import Batch

        spans = []
        for c in chunks:
            end = c.start_pos + len(c.token_ids)
            if end > self.max_model_len:
                raise ValueError(f"sequence {c.seq_id} reaches position {end}, beyond max_model_len "
                                 f"({self.max_model_len})")
            spans.append((c.token_ids, c.start_pos, c.num_logits if c.need_logits else 0, c.global_blocks,
                          c.chunk_start, c.chunked_blocks))
        copies = [c for chunk in chunks for c in chunk.block_copies]
        if copies:  # before the forward writes anything: a source may be a block another sequence appends to
            self.model.copy_blocks(copies)
        batch = Batch.build(spans, self.device, self.cfg.attention_chunk_size, self.kv_plan.block_size)
        batch.workspace = self.workspace
        if any(c.mm_embeds is not None for c in chunks):
            from serving.engine.multimodal import attach_image_embeds

            attach_image_embeds(batch, chunks)
        return self.model(batch)

    def routed_token_counts(self) -> torch.Tensor:
        moes = self.model.moe_layers()
        if not moes:
            return torch.zeros(0, self.cfg.num_local_experts, dtype=torch.long)
        return torch.stack([m.routed_token_counts for m in moes]).cpu()

    def rebuild(self) -> None:
        """Nothing can die in-process; the engine forgets its sequences and their blocks."""

    def shutdown(self) -> None:
        pass

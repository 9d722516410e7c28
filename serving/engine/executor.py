"""Executors run the model for the engine core: one step = a list of sequence chunks in, next-token logits out.

The engine (scheduler, sampling, detokenization) drives any object with the `Executor` interface; which one is
picked by `serving.build.build_executor`, outside this package. `LocalExecutor` runs `serving.model.Transformer`
in this process on one device; the expert-parallel executor (serving/expert_parallel/executor.py) runs the same
model sharded over Ray workers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from llama4.config import TextConfig
from serving.engine.kv_cache import KVCachePlan, SlotTable, plan_kv_cache

log = logging.getLogger(__name__)


@dataclass
class SeqChunk:
    """One sequence's tokens to run this step."""

    seq_id: int
    token_ids: list[int]  # a prefill piece (never crossing an attention-chunk boundary) or one decode token
    start_pos: int  # absolute position of token_ids[0]
    need_logits: bool  # True when the last token's logits are needed (decode, or the last prefill piece)
    mm_embeds: tuple[list[int], torch.Tensor] | None = None  # image rows: (offsets in token_ids, [R, D] embeddings)


class Executor(Protocol):
    max_num_seqs: int  # KV slots

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """float32 logits [number of chunks with need_logits, V], in chunk order."""

    def free(self, seq_id: int) -> None:
        """Release the sequence's cache slot."""

    def routed_token_counts(self) -> torch.Tensor:
        """int64 [num_moe_layers, num_experts], cumulative."""

    def kv_cache_usage(self) -> float:
        """Fraction of KV slots held, 0..1."""

    def rebuild(self) -> None:
        """After a `WorkerDiedError`: replace what died and forget every sequence (the engine re-admits them)."""

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Runs the model in this process: one static KV cache, one slot per live sequence."""

    def __init__(self, model, plan: KVCachePlan):
        from serving.model import Transformer

        assert isinstance(model, Transformer)
        self.model = model
        self.cfg: TextConfig = model.cfg
        self.plan = plan
        self.max_num_seqs = plan.num_slots
        self.max_model_len = plan.max_model_len
        self.device = model.embed_tokens.weight.device
        self.slots = SlotTable(plan.num_slots)
        model.allocate_kv_cache(plan.num_slots, plan.max_model_len)
        log.info(plan.describe())

    @classmethod
    def from_config(cls, config) -> "LocalExecutor":
        """Load the model named by a `serving.config.EngineConfig` and size its cache."""
        from serving.loader import load_shard, open_reader, resolve_dtype

        m, c = config.model, config.cache
        plan = plan_kv_cache(m.text, c.max_model_len, resolve_dtype(m.dtype), config.scheduler.max_num_seqs,
                             c.kv_cache_memory_bytes)
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
            spans.append((self.slots.slot_for(c.seq_id), c.token_ids, c.start_pos, c.need_logits))
        batch = Batch.build(spans, self.device, self.cfg.attention_chunk_size)
        if any(c.mm_embeds is not None for c in chunks):
            from serving.engine.multimodal import attach_image_embeds

            attach_image_embeds(batch, chunks)
        return self.model(batch)

    def free(self, seq_id: int) -> None:
        self.slots.free(seq_id)

    def routed_token_counts(self) -> torch.Tensor:
        moes = self.model.moe_layers()
        if not moes:
            return torch.zeros(0, self.cfg.num_local_experts, dtype=torch.long)
        return torch.stack([m.routed_token_counts for m in moes]).cpu()

    def kv_cache_usage(self) -> float:
        return self.slots.usage()

    def rebuild(self) -> None:
        """Nothing can die in-process; forget every sequence so the engine can start afresh."""
        self.slots.reset()

    def shutdown(self) -> None:
        self.slots.reset()

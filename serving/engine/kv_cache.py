"""KV-cache sizing and slot bookkeeping: how many sequences fit a memory budget, and which slot each one holds.

The cache is static, allocated once (gpt-fast style): every slot can hold one sequence of `max_model_len` tokens.
Per slot, global (NoPE) layers keep all `max_model_len` positions and chunked (RoPE) layers keep only the
current attention chunk (a ring of `attention_chunk_size` entries), so a slot costs
`llama4.sizing.kv_bytes_per_token(cfg).sequence_bytes(max_model_len)`: the same arithmetic the cluster planner
uses. A sequence takes a slot when its first piece runs and gives it back the moment it finishes or is aborted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama4.config import TextConfig
from llama4.sizing import kv_bytes_per_token

_SIZING_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "bf16"}  # fp16 costs as bf16


@dataclass(frozen=True)
class KVCachePlan:
    """The cache's shape and cost, decided before allocation."""

    num_slots: int
    max_model_len: int
    kv_dtype: str  # sizing name: fp32 / bf16
    bytes_per_token_per_layer: float  # K and V of one token in one layer (either layer type)
    chunked_layers: int  # RoPE layers: at most `chunk_size` tokens per sequence
    global_layers: int  # NoPE layers: every token of the context
    chunk_size: int
    bytes_per_sequence: float  # one full slot

    @property
    def total_bytes(self) -> float:
        return self.num_slots * self.bytes_per_sequence

    def bytes_per_token(self) -> dict[str, float]:
        """Bytes one cached token costs in one layer of each type (the cap differs, not the per-token cost)."""
        return {"chunked_attention": self.bytes_per_token_per_layer, "global_attention": self.bytes_per_token_per_layer}

    def describe(self) -> str:
        return (f"KV cache: {self.num_slots} sequences x {self.max_model_len} tokens, {self.kv_dtype}, "
                f"{self.total_bytes / 2**20:.1f} MiB; {self.bytes_per_token_per_layer:.0f} B/token/layer; "
                f"{self.chunked_layers} chunked layers keep <= {min(self.chunk_size, self.max_model_len)} tokens, "
                f"{self.global_layers} global layers keep all")


def plan_kv_cache(cfg: TextConfig, max_model_len: int, dtype: torch.dtype, max_num_seqs: int,
                  memory_bytes: float | None = None, tensor_parallel_size: int | None = None) -> KVCachePlan:
    """Size the cache: `max_num_seqs` slots, or as many as `memory_bytes` holds when a budget is given.

    tensor_parallel_size: set for an expert-parallel worker (None: the single-process engine). Each of a node's
    workers keeps 1/tp of the KV heads, so a sequence costs one worker 1/tp of a whole slot, and `memory_bytes`
    is that worker's budget (the planner's per-GPU figure).
    """
    tp = tensor_parallel_size or 1
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    if max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings}); lower max_model_len")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    name = _SIZING_NAMES.get(dtype, "fp32")
    per = kv_bytes_per_token(cfg, name)
    per_seq = per.sequence_bytes(max_model_len) / tp
    slots = max_num_seqs
    if memory_bytes is not None:
        fit = int(memory_bytes // per_seq)
        if fit < 1:
            who = (f", per worker) cannot hold one sequence of max_model_len={max_model_len} tokens ({int(per_seq)} "
                   f"bytes per worker at tensor_parallel_size={tp}" if tensor_parallel_size else
                   f") cannot hold one sequence of max_model_len={max_model_len} tokens ({int(per_seq)} bytes")
            raise ValueError(f"kv_cache_memory_bytes ({int(memory_bytes)}{who}); raise the budget or lower "
                             "max_model_len")
        slots = min(max_num_seqs, fit)
    return KVCachePlan(slots, max_model_len, name, per.per_layer / tp, per.chunked_layers,
                       per.global_layers, per.chunk_size, per_seq)


class SlotTable:
    """Which cache slot each live sequence holds; slots are handed out lowest first and returned on free."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[int, int] = {}

    def slot_for(self, seq_id: int) -> int:
        """The sequence's slot, taking a free one the first time it is seen."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            if not self._free:
                raise RuntimeError(f"no free KV-cache slot for sequence {seq_id}: all {self.num_slots} are held "
                                   "(the scheduler admits at most max_num_seqs sequences)")
            slot = self._slot_of[seq_id] = self._free.pop()
        return slot

    def free(self, seq_id: int) -> None:
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)

    def reset(self) -> None:
        self.__init__(self.num_slots)

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    def usage(self) -> float:
        return self.num_used / self.num_slots if self.num_slots else 0.0

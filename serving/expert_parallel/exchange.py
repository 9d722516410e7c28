"""All-to-all token exchange for one MoE layer: dispatch tokens to their experts' owners, compute, combine back.

Every worker calls `ExpertExchange.forward` for every MoE layer of every step, in the same order, even with no
tokens (an idle node passes T = 0), because the all-to-all is a collective over all workers of the replica.

Steps, with the collectives each one issues:
1. dispatch: scale each token's input by its router score (Llama 4 scales the expert INPUT), pick the copy of
   its expert that serves it, sort assignments by (owner worker, slot); all-to-all the per-(worker, slot)
   counts, then the rows themselves (uneven splits).
2. compute: the received rows, grouped by local slot, through each held expert's SwiGLU (serving/moe.py, the
   kernel the single-process model uses too).
3. combine: all-to-all the outputs back along the reversed splits, unsort, sum each token's K outputs.

Legend: T tokens on this worker, D hidden, K experts per token, A = T*K assignments, E logical experts,
C most copies of any expert, W workers, S most slots on any worker, R rows received here, I expert hidden.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from serving import moe


@dataclass
class ExpertShard:
    """The routed experts one worker holds for one layer, in slot order, HF layout ([in, out])."""

    expert_ids: list[int]
    gate_up_SDI2: torch.Tensor  # [S_local, D, 2I], gate first
    down_SID: torch.Tensor  # [S_local, I, D]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up_SDI2, self.down_SID))


@dataclass
class LayerRoute:
    """Where each logical expert of one layer is computed: rank and slot of each of its copies."""

    owner_EC: torch.Tensor  # [E, C] int64 worker rank of copy c (padded by repeating copy 0)
    slot_EC: torch.Tensor  # [E, C] int64 slot on that worker
    num_copies_E: torch.Tensor  # [E] int64
    num_workers: int
    max_slots: int

    @classmethod
    def from_placement(cls, placement, layer: int) -> "LayerRoute":
        """Build from a `cluster.placement.PlacementMap` (any object with copies/rank/num_workers)."""
        copies = [placement.copies(layer, e) for e in range(placement.num_experts)]
        C = max(len(c) for c in copies)
        owner = [[placement.rank(c.node, c.worker) for c in cs] + [placement.rank(cs[0].node, cs[0].worker)] *
                 (C - len(cs)) for cs in copies]
        slot = [[c.slot for c in cs] + [cs[0].slot] * (C - len(cs)) for cs in copies]
        max_slots = max(c.slot for cs in copies for c in cs) + 1
        return cls(torch.tensor(owner), torch.tensor(slot), torch.tensor([len(c) for c in copies]),
                   placement.num_workers, max_slots)


@dataclass
class ExchangeTimes:
    """Seconds spent per phase, summed over calls (for the benchmark and monitoring)."""

    dispatch: float = 0.0
    compute: float = 0.0
    combine: float = 0.0
    calls: int = 0


class ExpertExchange:
    """Runs one layer's routed experts across all workers of the group (`group` = the expert-parallel group)."""

    def __init__(self, shard: ExpertShard, route: LayerRoute, rank: int, group=None,
                 times: ExchangeTimes | None = None):
        self.shard, self.rank, self.group = shard, rank, group
        self.device = shard.gate_up_SDI2.device
        # The routing tables index the (device) routing output, so they live where the experts do.
        self.route = LayerRoute(route.owner_EC.to(self.device), route.slot_EC.to(self.device),
                                route.num_copies_E.to(self.device), route.num_workers, route.max_slots)
        self.times = times if times is not None else ExchangeTimes()

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, scale_TK: torch.Tensor) -> torch.Tensor:
        """Routed-expert output [T, D] for this worker's tokens; `scale_TK` is the router score (post sigmoid)."""
        t0 = time.perf_counter()
        T, K = topk_idx_TK.shape
        D = x_TD.shape[-1]
        W, S = self.route.num_workers, self.route.max_slots
        dev = x_TD.device
        token_A = torch.arange(T, device=dev).repeat_interleave(K)
        expert_A = topk_idx_TK.reshape(-1).long()
        x_AD = x_TD[token_A] * scale_TK.reshape(-1, 1).to(x_TD.dtype)
        copy_A = token_A % self.route.num_copies_E[expert_A]  # spread a replicated expert's tokens over copies
        dest_A = self.route.owner_EC[expert_A, copy_A]
        key_A = dest_A * S + self.route.slot_EC[expert_A, copy_A]
        order_A = torch.argsort(key_A, stable=True)
        send_counts_WS = torch.bincount(key_A, minlength=W * S)
        recv_counts_WS = self._all_to_all(send_counts_WS, [S] * W, [S] * W).view(W, S)
        send_splits = send_counts_WS.view(W, S).sum(1).tolist()
        recv_splits = recv_counts_WS.sum(1).tolist()
        recv_RD = self._all_to_all(x_AD[order_A], recv_splits, send_splits)
        t1 = time.perf_counter()

        slot_R = torch.arange(S, device=dev).repeat(W).repeat_interleave(recv_counts_WS.reshape(-1))
        y_RD = self._compute(recv_RD, slot_R)
        t2 = time.perf_counter()

        back_AD = self._all_to_all(y_RD, send_splits, recv_splits)
        y_AD = torch.empty_like(back_AD)
        y_AD[order_A] = back_AD
        y_TD = torch.zeros(T, D, dtype=y_AD.dtype, device=dev).index_add_(0, token_A, y_AD)
        t3 = time.perf_counter()
        tm = self.times
        tm.dispatch += t1 - t0
        tm.compute += t2 - t1
        tm.combine += t3 - t2
        tm.calls += 1
        return y_TD

    def _compute(self, x_RD: torch.Tensor, slot_R: torch.Tensor) -> torch.Tensor:
        return moe.swiglu_by_slot(x_RD, slot_R, self.shard.gate_up_SDI2, self.shard.down_SID)

    def _all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """all_to_all_single along dim 0; half-precision rows travel as raw bytes (gloo lacks bf16/int16; exact).

        On GPUs (NCCL) the tensors stay on the device; the split sizes are host lists, so the counts exchange
        before the rows is the one device-to-host sync of each dispatch.
        """
        import torch.distributed as dist

        wire = x.contiguous()
        if wire.dtype in (torch.bfloat16, torch.float16):
            wire = wire.view(torch.uint8)
        out = torch.empty((sum(out_splits), *wire.shape[1:]), dtype=wire.dtype, device=wire.device)
        dist.all_to_all_single(out, wire, out_splits, in_splits, group=self.group)
        return out.view(x.dtype) if out.dtype != x.dtype else out

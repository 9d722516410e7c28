"""The routed-expert kernel: grouped SwiGLU over the tokens routed to the experts this process holds.

Used by the single-process model (`serving.model.RoutedExperts`) and by the expert-parallel exchange
(`serving.expert_parallel.exchange`, on the rows other workers sent here), so speed work on the routed experts
(where CPU decode time goes at 32 sequences) changes this one file.

Weights keep the released fused layout, [in, out]: gate_up [El, D, 2I] (gate first) and down [El, I, D].
Llama 4 scales each expert's INPUT by the router score (sigmoid of the chosen logit), so callers pass rows
already scaled, or the scores to scale them with.

Shape legend: T tokens, D hidden, K experts per token, A = T * K assignments, El experts held here (slots),
I expert intermediate size, N rows handed to the kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FEW_ASSIGNMENTS = 4  # up to this many (token, expert) pairs, skip the sort and index experts one by one


def group_by_slot(slot_N: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """Stable order that groups rows by expert slot, the slots that have rows, and how many rows each has."""
    order_N = torch.argsort(slot_N, stable=True)
    counts_El = torch.bincount(slot_N, minlength=num_slots)
    slots = counts_El.nonzero().flatten().tolist()
    return order_N, slots, counts_El[slots].tolist()


def grouped_swiglu(x_ND: torch.Tensor, slots: list[int], counts: list[int], gate_up_EDI2: torch.Tensor,
                   down_EID: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert (`counts[i]` consecutive rows for slot `slots[i]`), each group through its expert:
    down(silu(gate(x)) * up(x)). One pair of matmuls per expert that has rows."""
    y_ND = torch.empty_like(x_ND)
    start = 0
    for e, n in zip(slots, counts):
        gate_nI, up_nI = (x_ND[start:start + n] @ gate_up_EDI2[e]).chunk(2, dim=-1)
        y_ND[start:start + n] = (up_nI * F.silu(gate_nI)) @ down_EID[e]
        start += n
    return y_ND


def swiglu_by_slot(x_ND: torch.Tensor, slot_N: torch.Tensor, gate_up_EDI2: torch.Tensor,
                   down_EID: torch.Tensor) -> torch.Tensor:
    """Each row through the expert in its slot, rows in any order (the exchange's received rows)."""
    if x_ND.shape[0] == 0:
        return torch.empty_like(x_ND)
    order_N, slots, counts = group_by_slot(slot_N, gate_up_EDI2.shape[0])
    y_ND = torch.empty_like(x_ND)
    y_ND[order_N] = grouped_swiglu(x_ND[order_N], slots, counts, gate_up_EDI2, down_EID)
    return y_ND


def routed_experts(x_TD: torch.Tensor, slot_TK: torch.Tensor, weight_TK: torch.Tensor, gate_up_EDI2: torch.Tensor,
                   down_EID: torch.Tensor, holds_all: bool) -> torch.Tensor:
    """Sum over each token's K experts of score * expert(x), for the experts held here (slot -1: held elsewhere,
    contributes zero; expert parallelism sums over holders)."""
    T, K = slot_TK.shape
    if T * K <= FEW_ASSIGNMENTS:
        return _few(x_TD, slot_TK.reshape(-1).tolist(), weight_TK.reshape(-1), K, gate_up_EDI2, down_EID)
    slot_A, weight_A = slot_TK.reshape(-1), weight_TK.reshape(-1)  # assignment a = t * K + k
    token_A = torch.arange(T, device=x_TD.device)
    if K > 1:
        token_A = token_A.repeat_interleave(K)
    if not holds_all:
        held = slot_A >= 0
        slot_A, token_A, weight_A = slot_A[held], token_A[held], weight_A[held]
    out_TD = torch.zeros_like(x_TD)
    if slot_A.numel() == 0:
        return out_TD
    # Sorted dispatch: gather the rows already grouped by expert, so the output needs no unsort before the sum.
    order_A, slots, counts = group_by_slot(slot_A, gate_up_EDI2.shape[0])
    token_A, weight_A = token_A[order_A], weight_A[order_A]
    x_AD = x_TD[token_A] * weight_A[:, None]
    y_AD = grouped_swiglu(x_AD, slots, counts, gate_up_EDI2, down_EID)
    return out_TD.index_add_(0, token_A, y_AD)


def _few(x_TD: torch.Tensor, slots: list[int], weight_A: torch.Tensor, K: int, gate_up_EDI2: torch.Tensor,
         down_EID: torch.Tensor) -> torch.Tensor:
    """A handful of assignments (decoding one or two sequences): index each expert directly, no sort."""
    out_TD = torch.zeros_like(x_TD)
    for a, e in enumerate(slots):
        if e < 0:
            continue
        t = a // K
        x_1D = x_TD[t:t + 1] * weight_A[a:a + 1, None]
        gate_1I, up_1I = (x_1D @ gate_up_EDI2[e]).chunk(2, dim=-1)
        out_TD[t:t + 1] += (up_1I * F.silu(gate_1I)) @ down_EID[e]
    return out_TD

"""One MoE layer's routed experts run across the group on seeded random data: for tests and the benchmark.

Every worker builds only its own experts (each expert's weights come from a generator seeded by its id, so a
reference on the driver can rebuild any of them) and its own tokens, then runs the all-to-all exchange. The same
function measures dispatch / compute / combine for `bench/expert_parallel.py`.

Legend: T tokens per worker, D hidden, I expert hidden, E experts, K experts per token.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from serving.expert_parallel.exchange import ExpertExchange, ExpertShard, LayerRoute


def expert_weights(e: int, D: int, I: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's (gate_up [D, 2I], down [I, D]), fan-in scaled."""
    g = torch.Generator().manual_seed(seed * 100_003 + e)
    return torch.randn(D, 2 * I, generator=g) / D**0.5, torch.randn(I, D, generator=g) / I**0.5


def worker_tokens(rank: int, T: int, D: int, E: int, K: int, seed: int):
    """A worker's tokens: x [T, D], top-k expert ids [T, K], router scores [T, K] in (0, 1)."""
    g = torch.Generator().manual_seed(seed * 7919 + rank + 1)
    x_TD = torch.randn(T, D, generator=g)
    logits_TE = torch.randn(T, E, generator=g)
    top_TK, idx_TK = logits_TE.topk(K, dim=-1)
    return x_TD, idx_TK, torch.sigmoid(top_TK)


def reference(x_TD, idx_TK, scale_TK, D: int, I: int, seed: int) -> torch.Tensor:
    """What one process holding every expert computes for these tokens, token by token (independent of the
    grouped kernel in serving/moe.py, which the exchange runs)."""
    y_TD = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(idx_TK.shape[1]):
            gu, dn = expert_weights(int(idx_TK[t, k]), D, I, seed)
            gate_1I, up_1I = (x_TD[t:t + 1] * scale_TK[t, k] @ gu).chunk(2, dim=-1)
            y_TD[t] += ((F.silu(gate_1I) * up_1I) @ dn)[0]
    return y_TD


def run_trial(worker, placement_json: str, layer: int, D: int, I: int, T: int | list[int], K: int, seed: int,
              repeats: int = 1, dtype: str = "float32") -> dict:
    """Executed inside each worker (`EPWorker.run`): build this worker's experts, exchange `repeats` times.

    `T` is the token count per worker, or a list of counts by rank (0 = an idle worker that still takes part).
    """
    import torch.distributed as dist

    from cluster.placement import PlacementMap

    dt = getattr(torch, dtype)
    placement = PlacementMap.from_json(placement_json)
    ids = placement.experts_on(worker.rank, layer)
    weights = [expert_weights(e, D, I, seed) for e in ids]
    shard = ExpertShard(ids, torch.stack([w[0] for w in weights]).to(dt) if ids else torch.empty(0, D, 2 * I, dtype=dt),
                        torch.stack([w[1] for w in weights]).to(dt) if ids else torch.empty(0, I, D, dtype=dt))
    ex = ExpertExchange(shard, LayerRoute.from_placement(placement, layer), worker.rank)
    T = T[worker.rank] if isinstance(T, list) else T
    x_TD, idx_TK, scale_TK = worker_tokens(worker.rank, T, D, placement.num_experts, K, seed)
    phases = {"dispatch_s": [], "compute_s": [], "combine_s": []}
    tm = ex.times
    for _ in range(repeats):
        dist.barrier()  # start each repeat together, so one worker's lag is not billed to the next repeat
        before = (tm.dispatch, tm.compute, tm.combine)
        y_TD = ex.forward(x_TD.to(dt), idx_TK, scale_TK)
        for key, b, a in zip(phases, before, (tm.dispatch, tm.compute, tm.combine)):
            phases[key].append(a - b)
    # Medians: on a shared machine a few repeats lose the CPU to other work.
    return {"y": y_TD.float(), "expert_ids": ids, "held_bytes": shard.nbytes,
            **{k: statistics.median(v) for k, v in phases.items()}}

"""Tensor parallelism within a node, applied to a `serving.model.Transformer` from outside (gpt-fast `tp.py` style).

Each of a node's `tp` workers keeps only its share of the non-expert weights and the model gets the collectives
it then needs, as forward hooks; model.py itself knows nothing about it. Applied to the model on the meta device
before loading, it also tags each sharded Linear (`tp_shard = (dim, rank)`) so the loader reads only that share.
- Attention: q/k/v projections keep this rank's heads (rows), o_proj the matching input columns; o_proj's
  partial output is all-reduced. Query head h reads kv head h // G, so contiguous head blocks stay aligned.
- Dense MLP and shared expert: gate/up keep a block of the hidden units (rows), down the matching columns.
- MoE layers: the shared expert's partial sum and this rank's slice of the routed-expert output
  (shard_runner.ParallelExperts) are added first and all-reduced ONCE for the whole feed-forward block.
- Router, norms, embeddings and lm_head stay whole (they are small next to the experts; lm_head is the
  biggest, sharding it by vocabulary is the next step for real Maverick).
"""
from __future__ import annotations

import torch
from torch import nn


def _check_divisible(what: str, n: int, tp: int) -> None:
    if n % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide the model's {what} ({n}); "
                         f"choose a tensor_parallel_size that divides it")


def _shard_rows(linear: nn.Linear, rank: int, tp: int) -> None:
    """Keep output features [rank*n/tp, (rank+1)*n/tp) (column-parallel in Megatron's words)."""
    w = linear.weight.detach()
    n = w.shape[0] // tp
    linear.weight = nn.Parameter(w[rank * n:(rank + 1) * n].clone(), requires_grad=False)
    linear.out_features = n
    linear.tp_shard = (0, rank)  # the loader reads only these rows of the checkpoint tensor


def _shard_cols(linear: nn.Linear, rank: int, tp: int) -> None:
    """Keep input features [rank*n/tp, ...) (row-parallel): the output is a partial sum over ranks."""
    w = linear.weight.detach()
    n = w.shape[1] // tp
    linear.weight = nn.Parameter(w[:, rank * n:(rank + 1) * n].clone(), requires_grad=False)
    linear.in_features = n
    linear.tp_shard = (1, rank)


def _all_reduce_output(module: nn.Module, group) -> None:
    import torch.distributed as dist

    def hook(_mod, _inp, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)
        return out

    module.register_forward_hook(hook)


def shard_swiglu(mlp: nn.Module, rank: int, tp: int) -> None:
    _check_divisible("MLP hidden size", mlp.gate_proj.out_features, tp)
    _shard_rows(mlp.gate_proj, rank, tp)
    _shard_rows(mlp.up_proj, rank, tp)
    _shard_cols(mlp.down_proj, rank, tp)


def shard_attention(attn: nn.Module, rank: int, tp: int) -> None:
    _check_divisible("number of key/value heads", attn.n_kv_heads, tp)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        _shard_rows(proj, rank, tp)
    _shard_cols(attn.o_proj, rank, tp)
    attn.n_heads //= tp
    attn.n_kv_heads //= tp


def apply_tensor_parallel(model: nn.Module, rank: int, tp: int, group) -> None:
    """Shard every layer's attention and MLPs over the `tp` ranks of `group`; adds the all-reduces."""
    if tp == 1:
        return
    for layer in model.layers:
        shard_attention(layer.self_attn, rank, tp)
        _all_reduce_output(layer.self_attn.o_proj, group)
        if layer.is_moe:
            shard_swiglu(layer.feed_forward.shared_expert, rank, tp)
            _all_reduce_output(layer.feed_forward, group)  # shared partial + routed slice, reduced together
        else:
            shard_swiglu(layer.feed_forward, rank, tp)
            _all_reduce_output(layer.feed_forward.down_proj, group)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())

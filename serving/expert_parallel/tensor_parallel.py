"""Tensor parallelism within a node, applied to a `serving.model.Transformer` from outside (gpt-fast `tp.py` style).

Each of a node's `tp` workers keeps only its share of the non-expert weights and the model gets the collectives
it then needs, as forward hooks; model.py itself knows nothing about it. Applied to the model on the meta device
before loading, it also tags each sharded Linear with `tp_shard = (dim, start, stop)`, the rows (dim 0) or
columns (dim 1) of the checkpoint tensor it keeps, so the loader (serving/loader.py) reads only that share.
- Attention: q/k/v projections keep this rank's heads (rows), o_proj the matching input columns; o_proj's
  partial output is all-reduced. Query head h reads kv head h // G, so contiguous head blocks stay aligned.
- Dense MLP and shared expert: gate/up keep a block of the hidden units (rows), down the matching columns.
- MoE layers: the shared expert's partial sum and this rank's slice of the routed-expert output
  (shard_runner.ParallelExperts) are added first and all-reduced ONCE for the whole feed-forward block.
- Embeddings and lm_head are split by vocabulary (Maverick's are 1.6 GB each in bf16, the biggest non-expert
  tensors): each rank holds a contiguous block of ceil(V/tp) token rows. An embedding lookup zeroes the ids
  outside the block and all-reduces (exact: one rank contributes each row); lm_head's partial logits are
  all-gathered, so every rank of the node has the full [N, V].
- Router and norms stay whole: the router is E x D (0.2% of a layer) and every rank needs all of its scores.
"""
from __future__ import annotations

import torch
from torch import nn


def vocab_block(vocab_size: int, rank: int, tp: int) -> tuple[int, int]:
    """Token rows [start, stop) a rank holds: blocks of ceil(V/tp), the last one shorter when tp does not divide V."""
    block = -(-vocab_size // tp)
    return min(rank * block, vocab_size), min((rank + 1) * block, vocab_size)


def _shard_rows(linear: nn.Module, rank: int, tp: int, bounds: tuple[int, int] | None = None) -> None:
    """Keep output features [rank*n/tp, (rank+1)*n/tp) (column-parallel in Megatron's words), or `bounds`."""
    w = linear.weight.detach()
    n = w.shape[0] // tp
    start, stop = bounds or (rank * n, (rank + 1) * n)
    linear.weight = nn.Parameter(w[start:stop].clone(), requires_grad=False)
    if isinstance(linear, nn.Linear):
        linear.out_features = stop - start
    linear.tp_shard = (0, start, stop)  # the loader reads only these rows of the checkpoint tensor


def _shard_cols(linear: nn.Linear, rank: int, tp: int) -> None:
    """Keep input features [rank*n/tp, ...) (row-parallel): the output is a partial sum over ranks."""
    w = linear.weight.detach()
    n = w.shape[1] // tp
    linear.weight = nn.Parameter(w[:, rank * n:(rank + 1) * n].clone(), requires_grad=False)
    linear.in_features = n
    linear.tp_shard = (1, rank * n, (rank + 1) * n)


class VocabParallelEmbedding(nn.Module):
    """This rank's block of the embedding table; the lookup is completed by an all-reduce over the node."""

    def __init__(self, table: nn.Embedding, rank: int, tp: int, group):
        super().__init__()
        self.start, self.stop = vocab_block(table.num_embeddings, rank, tp)
        self.weight = table.weight  # sharded by _shard_rows below, so the loader sees the same tag as lm_head's
        _shard_rows(self, rank, tp, (self.start, self.stop))
        self.group = group

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.stop == self.start:  # more ranks than vocabulary blocks: nothing held here
            x_TD = self.weight.new_zeros(ids_T.shape[0], self.weight.shape[1])
            dist.all_reduce(x_TD, group=self.group)
            return x_TD
        here_T = (ids_T >= self.start) & (ids_T < self.stop)
        x_TD = nn.functional.embedding((ids_T - self.start) * here_T, self.weight)
        x_TD = x_TD * here_T[:, None].to(x_TD.dtype)
        dist.all_reduce(x_TD, group=self.group)
        return x_TD


def _gather_vocab(lm_head: nn.Linear, vocab_size: int, tp: int, group) -> None:
    """After lm_head, all-gather the ranks' logit blocks into [N, V] (blocks padded to one size for the gather)."""
    import torch.distributed as dist

    block = -(-vocab_size // tp)

    def hook(_mod, _inp, out_NV: torch.Tensor) -> torch.Tensor:
        part = out_NV.new_zeros(out_NV.shape[0], block)
        part[:, :out_NV.shape[1]] = out_NV
        parts = [torch.empty_like(part) for _ in range(tp)]
        dist.all_gather(parts, part, group=group)
        return torch.cat(parts, dim=1)[:, :vocab_size]

    lm_head.register_forward_hook(hook)


def _all_reduce_output(module: nn.Module, group) -> None:
    import torch.distributed as dist

    def hook(_mod, _inp, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)
        return out

    module.register_forward_hook(hook)


def shard_swiglu(mlp: nn.Module, rank: int, tp: int) -> None:
    _shard_rows(mlp.gate_proj, rank, tp)
    _shard_rows(mlp.up_proj, rank, tp)
    _shard_cols(mlp.down_proj, rank, tp)


def shard_attention(attn: nn.Module, rank: int, tp: int) -> None:
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        _shard_rows(proj, rank, tp)
    _shard_cols(attn.o_proj, rank, tp)
    attn.n_heads //= tp
    attn.n_kv_heads //= tp


def apply_tensor_parallel(model: nn.Module, rank: int, tp: int, group) -> None:
    """Shard every layer's attention and MLPs over the `tp` ranks of `group`; adds the all-reduces. The layout
    was checked once (serving.config.check_layout: tp divides the heads and hidden sizes)."""
    if tp == 1:
        return
    V = model.embed_tokens.num_embeddings
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, rank, tp, group)
    _shard_rows(model.lm_head, rank, tp, vocab_block(V, rank, tp))
    _gather_vocab(model.lm_head, V, tp, group)
    for layer in model.layers:
        shard_attention(layer.self_attn, rank, tp)
        _all_reduce_output(layer.self_attn.o_proj, group)
        if layer.is_moe:
            shard_swiglu(layer.feed_forward.shared_expert, rank, tp)
            _all_reduce_output(layer.feed_forward, group)  # shared partial + routed slice, reduced together
        else:
            shard_swiglu(layer.feed_forward, rank, tp)
            _all_reduce_output(layer.feed_forward.down_proj, group)


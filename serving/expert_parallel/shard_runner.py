"""What runs inside one expert-parallel worker: its model shard, its node's KV cache, its steps.

Loading: the model is built with only this worker's experts in each MoE layer (the placement map says which),
read through `llama4.checkpoint.CheckpointReader` from a folder or `S3Checkpoint` from `s3://` (byte ranges into
the node-local cache); then the node's tensor parallelism is applied and every `RoutedExperts` module is swapped
for `ParallelExperts`, which sends tokens to their experts' owners all-to-all.

Stepping: all workers of a node receive the node's sequence chunks (attention is data-parallel across nodes);
a node with no work still joins every MoE layer's all-to-all with zero tokens, so the collectives line up.

Legend: T tokens, D hidden, K experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from serving.expert_parallel.exchange import ExchangeTimes, ExpertExchange, ExpertShard, LayerRoute


@dataclass
class ShardSpec:
    """Everything a worker needs to load its shard (sent once per worker; small)."""

    path: str  # checkpoint folder, or s3://bucket/prefix
    config: dict  # TextConfig fields as config.json has them (workers need no local copy)
    dtype: str
    placement_json: str
    slots_per_node: int
    max_model_len: int
    s3_endpoint_url: str | None = None
    cache_dir: str | None = None  # node-local cache for s3:// checkpoints (a per-node subfolder is used)


class ParallelExperts(nn.Module):
    """Stands in for `serving.model.RoutedExperts`: the same call, computed by whichever workers own the experts.

    With tensor parallelism each of the node's ranks sends only its 1/tp slice of the tokens and returns zeros
    elsewhere; the MoE block's all-reduce (tensor_parallel.py) puts the slices together.
    """

    def __init__(self, exchange: ExpertExchange, tp_rank: int, tp: int):
        super().__init__()
        self.exchange = exchange
        self.expert_ids = list(exchange.shard.expert_ids)
        self.tp_rank, self.tp = tp_rank, tp

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return self.exchange.forward(x_TD, topk_idx_TK, topk_weight_TK)
        rows = torch.tensor_split(torch.arange(x_TD.shape[0]), self.tp)[self.tp_rank]
        y_TD = torch.zeros_like(x_TD)
        y_TD[rows] = self.exchange.forward(x_TD[rows], topk_idx_TK[rows], topk_weight_TK[rows])
        return y_TD


def open_reader(spec: ShardSpec):
    """A CheckpointReader for a folder, or an S3Checkpoint caching into this node's own subfolder."""
    if spec.path.startswith("s3://"):
        import ray

        from serving.expert_parallel.s3 import S3Checkpoint

        base = Path(spec.cache_dir or Path.home() / ".cache" / "herd" / "s3")
        return S3Checkpoint(spec.path, base / ray.get_runtime_context().get_node_id()[:16],
                            endpoint_url=spec.s3_endpoint_url)
    from llama4.checkpoint import CheckpointReader

    return CheckpointReader(spec.path)


class ShardRunner:
    """This worker's model shard plus its node's KV-cache slots (one LocalExecutor per worker)."""

    def __init__(self, worker, spec: ShardSpec):
        from cluster.placement import PlacementMap
        from llama4.config import TextConfig
        from serving.engine.executor import LocalExecutor
        from serving.engine.kv_cache import plan_kv_cache
        from serving.expert_parallel.tensor_parallel import apply_tensor_parallel
        from serving.loader import resolve_dtype

        self.worker = worker
        cfg = TextConfig.from_dict(spec.config)
        placement = PlacementMap.from_json(spec.placement_json)
        reader = open_reader(spec)
        try:
            model = _load_shard(reader, cfg, spec.dtype, lambda layer: placement.experts_on(worker.rank, layer))
        finally:
            self.bytes_fetched = getattr(reader, "bytes_fetched", 0)
            reader.close()
        self.routed_bytes = sum(p.numel() * p.element_size() for m in model.moe_layers()
                                for p in m.experts.parameters())
        apply_tensor_parallel(model, worker.tp_rank, worker.tp_size, worker.tp_group)
        self.times = ExchangeTimes()
        self.exchanges: list[ExpertExchange] = []
        for i, layer in enumerate(model.layers):
            if layer.is_moe:
                old = layer.feed_forward.experts
                shard = ExpertShard(old.expert_ids, old.gate_up_proj.detach(), old.down_proj.detach())
                ex = ExpertExchange(shard, LayerRoute.from_placement(placement, i), worker.rank, times=self.times)
                layer.feed_forward.experts = ParallelExperts(ex, worker.tp_rank, worker.tp_size)
                self.exchanges.append(ex)
        self.model = model
        self.dtype = resolve_dtype(spec.dtype)
        plan = plan_kv_cache(cfg, spec.max_model_len, self.dtype, spec.slots_per_node)
        self.local = LocalExecutor(model, plan)
        self.k = cfg.num_experts_per_tok

    def held_bytes(self) -> dict:
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"rank": self.worker.rank, "node": self.worker.node, "routed_expert_bytes": self.routed_bytes,
                "other_bytes": total - self.routed_bytes, "bytes_fetched": self.bytes_fetched,
                "experts_per_layer": [len(ex.shard.expert_ids) for ex in self.exchanges]}

    def execute(self, chunks: list, node_has_work: bool):
        """Run the node's chunks (or an idle pass through every all-to-all); logits from the node's rank 0."""
        if not node_has_work:
            D = self.model.cfg.hidden_size
            with torch.inference_mode():
                for ex in self.exchanges:
                    ex.forward(torch.empty(0, D, dtype=self.dtype), torch.empty(0, self.k, dtype=torch.long),
                               torch.empty(0, self.k, dtype=self.dtype))
            return None
        logits = self.local.execute(chunks)
        return logits if self.worker.tp_rank == 0 else None

    def free(self, seq_ids: list[int]) -> None:
        for s in seq_ids:
            self.local.free(s)

    def routed_token_counts(self) -> torch.Tensor:
        return self.local.routed_token_counts()

    def kv_cache_usage(self) -> float:
        return self.local.kv_cache_usage()

    def exchange_times(self) -> dict:
        t = self.times
        return {"dispatch_s": t.dispatch, "compute_s": t.compute, "combine_s": t.combine, "calls": t.calls}


def _load_shard(reader, cfg, dtype: str, expert_ids) -> nn.Module:
    """serving.loader's procedure with a reader given (folder or S3): meta model, held experts only, fill."""
    from serving.loader import _load_weights, resolve_dtype
    from serving.model import RoutedExperts, Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
        for i, layer in enumerate(model.layers):
            if layer.is_moe:
                layer.feed_forward.experts = RoutedExperts(cfg, expert_ids(i))
    model = model.to(resolve_dtype(dtype)).to_empty(device="cpu")
    _load_weights(model, reader, cfg)
    model.reset_buffers()
    return model.eval().requires_grad_(False)

"""What runs inside one expert-parallel worker: its model shard, its node's KV cache, its steps.

Loading: the engine's one shard loader (`serving.loader.load_shard`) builds the model with only this worker's
experts in each MoE layer (the placement map says which) and the node's tensor parallelism applied, then fills
just that share from a folder or from `s3://` (byte ranges into the node-local cache), so a worker never holds
more than its share plus one tensor. Every `RoutedExperts` module is then swapped for `ParallelExperts`, which
sends tokens to their experts' owners all-to-all.

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
    kv_plan: object  # serving.engine.kv_cache.KVCachePlan: this node's block pools (the engine hands blocks out)
    max_model_len: int
    s3_endpoint_url: str | None = None
    cache_dir: str | None = None  # node-local cache for s3:// checkpoints (a per-node subfolder is used)
    lora_adapter: str | None = None  # PEFT adapter folder merged as the shard loads (serving/lora.py)


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
        T = x_TD.shape[0]  # this rank's block of rows [a, b), as slices (no index tensor to move to the GPU)
        a, b = (T * self.tp_rank) // self.tp, (T * (self.tp_rank + 1)) // self.tp
        y_TD = torch.zeros_like(x_TD)
        y_TD[a:b] = self.exchange.forward(x_TD[a:b], topk_idx_TK[a:b], topk_weight_TK[a:b])
        return y_TD


def open_shard_reader(spec: ShardSpec):
    """The loader's reader for this worker: the folder, or S3 caching into this node's own subfolder."""
    from serving.loader import open_reader

    cache_dir = None
    if spec.path.startswith("s3://"):
        import ray

        from serving.expert_parallel.s3 import cache_root

        base = Path(spec.cache_dir) if spec.cache_dir else cache_root() / "s3"
        cache_dir = base / ray.get_runtime_context().get_node_id()[:16]
    return open_reader(spec.path, lora_adapter=spec.lora_adapter, s3_endpoint_url=spec.s3_endpoint_url,
                       cache_dir=cache_dir)


class ShardRunner:
    """This worker's model shard plus its share of its node's KV-cache blocks (one LocalExecutor per worker)."""

    def __init__(self, worker, spec: ShardSpec):
        from cluster.placement import PlacementMap
        from llama4.config import TextConfig
        from serving.engine.executor import LocalExecutor
        from serving.expert_parallel.tensor_parallel import apply_tensor_parallel
        from serving.loader import load_shard, resolve_dtype

        self.worker = worker
        cfg = TextConfig.from_dict(spec.config)
        placement = PlacementMap.from_json(spec.placement_json)
        reader = open_shard_reader(spec)
        try:  # the engine's own loader: only this worker's experts and tensor-parallel share are read
            model = load_shard(cfg, reader, dtype=spec.dtype, device=worker.device,
                               expert_ids=lambda layer: placement.experts_on(worker.rank, layer),
                               shard=lambda m: apply_tensor_parallel(m, worker.tp_rank, worker.tp_size,
                                                                     worker.tp_group))
        finally:
            self.bytes_fetched = getattr(reader, "bytes_fetched", 0)
            reader.close()
        self.routed_bytes = sum(p.numel() * p.element_size() for m in model.moe_layers()
                                for p in m.experts.parameters())
        self.other_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - self.routed_bytes
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
        self.local = LocalExecutor(model, spec.kv_plan)
        self.kv_bytes = sum(t.numel() * t.element_size() for layer in model.layers
                            for t in (layer.self_attn.cache_k, layer.self_attn.cache_v))  # this worker's heads only
        self.k = cfg.num_experts_per_tok

    def held_bytes(self) -> dict:
        return {"rank": self.worker.rank, "node": self.worker.node, "routed_expert_bytes": self.routed_bytes,
                "other_bytes": self.other_bytes, "bytes_fetched": self.bytes_fetched, "kv_cache_bytes": self.kv_bytes,
                "kv_blocks": [self.local.kv_plan.global_blocks, self.local.kv_plan.chunked_blocks],
                "device": str(self.worker.device),
                "experts_per_layer": [len(ex.shard.expert_ids) for ex in self.exchanges]}

    def execute(self, chunks: list, node_has_work: bool):
        """Run the node's chunks (or an idle pass through every all-to-all); logits from the node's rank 0."""
        if not node_has_work:
            D, dev = self.model.cfg.hidden_size, self.worker.device
            with torch.inference_mode():
                for ex in self.exchanges:
                    ex.forward(torch.empty(0, D, dtype=self.dtype, device=dev),
                               torch.empty(0, self.k, dtype=torch.long, device=dev),
                               torch.empty(0, self.k, dtype=self.dtype, device=dev))
            return None
        logits = self.local.execute(chunks)
        # Only the node's first rank answers (every rank has the gathered logits); host memory for Ray's transfer.
        return logits.cpu() if self.worker.tp_rank == 0 else None

    def routed_token_counts(self) -> torch.Tensor:
        return self.local.routed_token_counts()

    def exchange_times(self) -> dict:
        t = self.times
        return {"dispatch_s": t.dispatch, "compute_s": t.compute, "combine_s": t.combine, "calls": t.calls}

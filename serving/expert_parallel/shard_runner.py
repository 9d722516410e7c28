"""What runs inside one expert-parallel worker: its model shard, its node's KV cache, its steps.

Loading: the model is built on the meta device with only this worker's experts in each MoE layer (the placement
map says which) and the node's tensor parallelism applied, then filled with just that share, read through
`llama4.checkpoint.CheckpointReader` from a folder or `S3Checkpoint` from `s3://` (byte ranges into the
node-local cache), so a worker never holds more than its share plus one tensor. Every `RoutedExperts` module is
then swapped for `ParallelExperts`, which sends tokens to their experts' owners all-to-all.

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


def open_reader(spec: ShardSpec):
    """A CheckpointReader for a folder, or an S3Checkpoint caching into this node's own subfolder; with an
    adapter, wrapped so that every tensor read comes back merged."""
    reader = _open_checkpoint(spec)
    if spec.lora_adapter is None:
        return reader
    from serving.lora import LoraAdapter, MergedReader

    return MergedReader(reader, LoraAdapter.load(spec.lora_adapter))


def _open_checkpoint(spec: ShardSpec):
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
            model = _meta_model(cfg, lambda layer: placement.experts_on(worker.rank, layer))
            apply_tensor_parallel(model, worker.tp_rank, worker.tp_size, worker.tp_group)  # shapes, hooks, tags
            model = model.to(resolve_dtype(spec.dtype)).to_empty(device=worker.device)
            _load_params(model, reader, cfg)
            if spec.lora_adapter is not None:
                reader.check_all_merged()
            model.reset_buffers()
            model.optimize_for_inference()  # the single-process engine's dense-weight layout (same values)
            model.eval().requires_grad_(False)
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
        plan = plan_kv_cache(cfg, spec.max_model_len, self.dtype, spec.slots_per_node)
        self.local = LocalExecutor(model, plan)
        self.kv_bytes = sum(t.numel() * t.element_size() for layer in model.layers
                            for t in (layer.self_attn.cache_k, layer.self_attn.cache_v))  # this worker's heads only
        self.k = cfg.num_experts_per_tok

    def held_bytes(self) -> dict:
        return {"rank": self.worker.rank, "node": self.worker.node, "routed_expert_bytes": self.routed_bytes,
                "other_bytes": self.other_bytes, "bytes_fetched": self.bytes_fetched, "kv_cache_bytes": self.kv_bytes,
                "kv_slots": self.local.max_num_seqs, "device": str(self.worker.device),
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


def _meta_model(cfg, expert_ids) -> nn.Module:
    """The model on the meta device, holding in each MoE layer only the experts `expert_ids(layer)`."""
    from serving.model import RoutedExperts, Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
        for i, layer in enumerate(model.layers):
            if layer.is_moe:
                layer.feed_forward.experts = RoutedExperts(cfg, expert_ids(i))
    return model


def _load_params(model: nn.Module, reader, cfg) -> None:
    """Fill every parameter with only its share: held experts' rows, a TP shard's rows (or columns), the rest whole.

    Row shards are read as row ranges (from S3: one byte range each); column shards read the tensor, then slice.
    """
    from llama4.checkpoint import CheckpointError
    from serving.model import RoutedExperts

    for name, param in model.named_parameters():
        owner_name, _, _ = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        ckpt = name if name.startswith("lm_head.") else "model." + name
        if ckpt == "lm_head.weight" and not reader.has(ckpt) and cfg.tie_word_embeddings:
            ckpt = "model.embed_tokens.weight"
        if not reader.has(ckpt):
            raise CheckpointError(f"tensor {reader.full_name(ckpt)!r} is missing from {reader.path}; "
                                  "is config.json the one that came with these weights?")
        shard = getattr(owner, "tp_shard", None)  # (dim, start, stop) of the checkpoint tensor, see tensor_parallel
        if isinstance(owner, RoutedExperts):
            tensor = reader.get_rows(ckpt, owner.expert_ids)
        elif shard is not None and shard[0] == 0:
            tensor = reader.get_rows(ckpt, range(shard[1], shard[2]))
        elif shard is not None:
            tensor = reader.get(ckpt)[:, shard[1]:shard[2]]
        else:
            tensor = reader.get(ckpt)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {reader.full_name(ckpt)!r} gives shape {tuple(tensor.shape)} but this "
                                  f"worker's shard of the model is {tuple(param.shape)}; config and weights disagree")
        with torch.no_grad():
            param.copy_(tensor)

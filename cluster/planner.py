"""The capacity planner: does this model fit this cluster, with how much context and concurrency, at what cost.

The layout (the engine follows the same one): a replica spans `nodes_per_replica` nodes of G GPUs. The
non-expert weights are tensor-parallel over each node's G GPUs (every node holds one copy and runs its own
share of the sequences); routed experts are split over all N*G GPUs of the replica. So per GPU:

    non-expert share = non_expert_bytes / G
    expert slice     = routed_bytes * (expert copies on the busiest GPU) / (experts * MoE layers)
    KV budget        = memory * gpu_memory_fraction - the two above - runtime reserve

KV heads are split over the node's GPUs like the attention weights, so a node's GPUs together hold each
sequence's cache once. Every byte figure comes from `llama4.sizing` (the engine's cache allocator uses the
same functions), which counts that chunked-attention layers keep at most `attention_chunk_size` tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from cluster.gpus import GPU_KINDS
from cluster.placement import PlacementMap
from cluster.schema import ClusterFileError, ClusterSpec
from llama4.config import TextConfig
from llama4.sizing import (DEFAULT_BLOCK_SIZE, DEFAULT_MEAN_SEQUENCE_TOKENS, BlockCounts, blocks_bytes, cache_tokens,
                           kv_bytes_per_token, kv_pools, longest_sequence, max_sequences, param_counts,
                           peak_sequence_blocks, sequences_in_pools, weight_bytes)

GB = 1e9


@dataclass(frozen=True)
class Layout:
    """The knobs the memory arithmetic depends on (the fix search varies them)."""

    weight_dtype: str
    kv_dtype: str
    gpus_per_node: int
    nodes_per_replica: int
    memory_per_gpu: float
    fraction: float
    reserve: float
    context: int
    concurrent: int
    expert_copies_per_gpu: int  # over all MoE layers, on the busiest GPU
    vision_bytes: float = 0.0  # vision encoder + projector, held beside the non-expert weights
    mean_tokens: int = DEFAULT_MEAN_SEQUENCE_TOKENS  # the sequence length the paged cache's pools are split for
    block_size: int = DEFAULT_BLOCK_SIZE

    @property
    def expert_parallel_size(self) -> int:
        return self.gpus_per_node * self.nodes_per_replica


@dataclass(frozen=True)
class GpuMemory:
    """Bytes on one GPU of the serving group."""

    total: float
    usable: float
    non_expert: float
    routed_experts: float
    reserve: float
    vision: float  # this GPU's share of the vision tower
    kv_budget: float
    kv_needed: float  # this GPU's share of max_concurrent_sequences at full context

    @property
    def weights(self) -> float:
        return self.non_expert + self.routed_experts + self.vision

    @property
    def headroom(self) -> float:
        """KV budget left after the configured concurrency at full context (negative: it does not all fit)."""
        return self.kv_budget - self.kv_needed


@dataclass(frozen=True)
class KVCapacity:
    """What the KV cache holds, per node, replica and cluster."""

    bytes_per_token_within_chunk: float  # every layer caches the token (context <= attention_chunk_size)
    bytes_per_token_beyond_chunk: float  # only the global NoPE layers grow past the chunk
    chunk_size: int
    chunked_layers: int
    global_layers: int
    sequence_bytes: float  # one full-context sequence, whole model
    sequences_per_node: int  # at full context, the cache split for full-context sequences
    sequences_per_replica: int
    sequences_total: int
    longest_context_per_node: int  # one sequence alone, with the whole cache (at most the model's context)
    context_for_target: int  # longest context at which max_concurrent_sequences all fit
    # The paged cache as the engine sizes it from this budget (serving/engine/kv_cache.py): pools of
    # `block_size`-token blocks holding one max_context_len sequence, the rest split for `mean_sequence_tokens`.
    block_size: int = DEFAULT_BLOCK_SIZE
    mean_sequence_tokens: int = DEFAULT_MEAN_SEQUENCE_TOKENS
    global_blocks_per_node: int = 0
    chunked_blocks_per_node: int = 0
    cache_tokens_per_node: int = 0  # tokens in the cache over all sequences (the global layers' pool)
    cache_tokens_per_replica: int = 0
    mean_sequences_per_node: int = 0  # sequences of mean_sequence_tokens the pools hold at once
    mean_sequences_per_replica: int = 0
    mean_sequences_total: int = 0


@dataclass(frozen=True)
class Cost:
    """Dollars: per hour from node prices; per million tokens only as an estimate from a stated throughput."""

    per_hour: float | None
    missing_prices: list[str]
    throughput_tok_s: float | None = None
    per_million_tokens: float | None = None
    assumption: str | None = None


@dataclass
class Plan:
    """The planner's answer; `fits` decides `herd plan`'s exit code."""

    cluster: str
    fits: bool
    reasons: list[str]
    fixes: list[str]
    warnings: list[str]
    model: dict
    layout: dict
    per_gpu: GpuMemory
    kv: KVCapacity
    placement: PlacementMap = field(repr=False)
    placement_source: str
    cost: Cost

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("placement", "per_gpu")}
        d["per_gpu"] = {**asdict(self.per_gpu), "weights": self.per_gpu.weights, "headroom": self.per_gpu.headroom}
        d["placement"] = {"source": self.placement_source, "uniform": self.placement.is_uniform(),
                          "workers": _worker_blocks(self.placement, self.layout["gpus_per_node"] > 0)}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def plan(spec: ClusterSpec, throughput: float | None = None) -> Plan:
    """Plan a cluster file; `throughput` (tokens/s over the cluster) adds a cost-per-million-tokens estimate."""
    cfg = spec.text_config
    s, group = spec.serving, spec.serving_group
    placement, source = _placement(spec, cfg)
    layout = Layout(
        weight_dtype=spec.model.weight_dtype, kv_dtype=spec.model.kv_cache_dtype,
        gpus_per_node=group.gpus_per_node, nodes_per_replica=s.nodes_per_replica,
        memory_per_gpu=group.memory_per_gpu(), fraction=s.gpu_memory_fraction, reserve=s.runtime_reserve_gib * 2**30,
        context=s.max_context_len, concurrent=s.max_concurrent_sequences,
        expert_copies_per_gpu=_busiest_worker_copies(placement),
        vision_bytes=_vision(spec, cfg)["weight_bytes_vision"], mean_tokens=s.mean_sequence_tokens,
    )
    mem, kv = memory(cfg, layout, replicas=s.replicas)
    reasons, fixes, warnings = _verdict(spec, cfg, layout, mem, kv)
    counts = param_counts(cfg)
    wb = weight_bytes(cfg, layout.weight_dtype)
    gi = spec.node_groups.index(group)
    return Plan(
        cluster=spec.name, fits=not reasons, reasons=reasons, fixes=fixes, warnings=warnings,
        model={"name": spec.model.preset or spec.model.checkpoint, "checkpoint": spec.model.checkpoint,
               "params_total": counts.total, "params_non_expert": counts.non_expert,
               "params_routed_experts": counts.routed_experts, "params_active": counts.active,
               "experts": cfg.num_local_experts, "moe_layers": cfg.num_moe_layers, "layers": cfg.num_hidden_layers,
               "weight_dtype": layout.weight_dtype, "kv_cache_dtype": layout.kv_dtype,
               "weight_bytes_non_expert": wb.non_expert, "weight_bytes_routed_experts": wb.routed_experts,
               **_vision(spec, cfg)},
        layout={"node_group": group.name, "node_group_index": gi, "gpu": group.gpu,
                "gpus_per_node": 0 if group.kind.is_cpu else group.gpus_per_node,
                "workers_per_node": group.gpus_per_node, "replicas": s.replicas,
                "nodes_per_replica": s.nodes_per_replica, "nodes_needed": s.replicas * s.nodes_per_replica,
                "nodes_available": group.count, "tensor_parallel_size": group.gpus_per_node,
                "expert_parallel_size": layout.expert_parallel_size,
                "max_context_len": s.max_context_len, "max_concurrent_sequences": s.max_concurrent_sequences,
                "mean_sequence_tokens": s.mean_sequence_tokens},
        per_gpu=mem, kv=kv, placement=placement, placement_source=source, cost=_cost(spec, throughput),
    )


def memory(cfg: TextConfig, layout: Layout, replicas: int = 1) -> tuple[GpuMemory, KVCapacity]:
    """Per-GPU bytes and KV capacity for one layout, from `llama4.sizing`."""
    wb = weight_bytes(cfg, layout.weight_dtype)
    g = layout.gpus_per_node
    per_expert_layer = wb.routed_experts / max(1, cfg.num_local_experts * cfg.num_moe_layers)
    non_expert = wb.non_expert / g
    experts = per_expert_layer * layout.expert_copies_per_gpu
    usable = layout.memory_per_gpu * layout.fraction
    vision = layout.vision_bytes / g  # split like the other non-expert weights
    budget = usable - non_expert - experts - vision - layout.reserve

    kvt = kv_bytes_per_token(cfg, layout.kv_dtype)
    # Share of a token's KV one GPU holds: KV heads split over the node's GPUs (replicated if fewer heads).
    share = math.ceil(cfg.num_key_value_heads / g) / cfg.num_key_value_heads
    node_budget = max(0.0, budget) / share  # whole-model KV bytes one node's GPUs hold together
    per_node = max_sequences(cfg, node_budget, layout.context, layout.kv_dtype) if node_budget > 0 else 0
    seqs_on_node = math.ceil(layout.concurrent / layout.nodes_per_replica)
    seq_bytes = kvt.sequence_bytes(layout.context)
    pools = _pools(kvt, node_budget, layout)
    at_mean = sequences_in_pools(kvt, pools, layout.mean_tokens, layout.block_size)
    limit = cfg.max_position_embeddings
    kv = KVCapacity(
        bytes_per_token_within_chunk=kvt.per_layer * (kvt.chunked_layers + kvt.global_layers),
        bytes_per_token_beyond_chunk=kvt.per_layer * kvt.global_layers,
        chunk_size=kvt.chunk_size, chunked_layers=kvt.chunked_layers, global_layers=kvt.global_layers,
        sequence_bytes=seq_bytes, sequences_per_node=per_node,
        sequences_per_replica=per_node * layout.nodes_per_replica,
        sequences_total=per_node * layout.nodes_per_replica * replicas,
        longest_context_per_node=longest_sequence(kvt, node_budget, layout.block_size, limit),
        context_for_target=longest_sequence(kvt, node_budget / seqs_on_node, layout.block_size, limit),
        block_size=layout.block_size, mean_sequence_tokens=layout.mean_tokens,
        global_blocks_per_node=pools.global_blocks, chunked_blocks_per_node=pools.chunked_blocks,
        cache_tokens_per_node=cache_tokens(kvt, pools, layout.block_size),
        cache_tokens_per_replica=cache_tokens(kvt, pools, layout.block_size) * layout.nodes_per_replica,
        mean_sequences_per_node=at_mean, mean_sequences_per_replica=at_mean * layout.nodes_per_replica,
        mean_sequences_total=at_mean * layout.nodes_per_replica * replicas,
    )
    mem = GpuMemory(total=layout.memory_per_gpu, usable=usable, non_expert=non_expert, routed_experts=experts,
                    reserve=layout.reserve, vision=vision, kv_budget=budget, kv_needed=seq_bytes * seqs_on_node * share)
    return mem, kv


def _vision(spec: ClusterSpec, cfg: TextConfig) -> dict:
    """The vision tower's parameters and bytes (bf16, or fp32 for fp32 weights), and the worst-case image tokens
    of one request: serving.images.max_per_request images of a full tile grid (16 tiles + the global one)."""
    from llama4.images import ImageConfig
    from llama4.sizing import vision_params

    v = spec.vision_config
    if not v:
        return {"params_vision": 0, "weight_bytes_vision": 0.0, "image_tokens_per_image_max": 0,
                "image_tokens_per_request_max": 0}
    params = vision_params(v, cfg.hidden_size)
    per_image = ImageConfig(tile_size=v["image_size"], patch_size=v["patch_size"],
                            pixel_shuffle_ratio=v["pixel_shuffle_ratio"]).max_image_tokens()
    return {"params_vision": params, "weight_bytes_vision": params * (4.0 if spec.model.weight_dtype == "fp32" else 2.0),
            "image_tokens_per_image_max": per_image,
            "image_tokens_per_request_max": per_image * spec.serving.images.max_per_request}


def _pools(kvt, node_budget: float, layout: Layout) -> BlockCounts:
    """The block pools a node's whole-model KV budget buys, as the engine splits them (none when the budget cannot
    hold one max_context_len sequence)."""
    one = peak_sequence_blocks(kvt, layout.context, layout.block_size)
    if node_budget <= 0 or node_budget < blocks_bytes(kvt, one, layout.block_size):
        return BlockCounts(0, 0)
    return kv_pools(kvt, node_budget, layout.context, layout.block_size, layout.mean_tokens)


def _placement(spec: ClusterSpec, cfg: TextConfig) -> tuple[PlacementMap, str]:
    from cluster.placement import PlacementError, resolve_placement

    group, s = spec.serving_group, spec.serving
    try:
        pm = resolve_placement(s.placement_file, list(cfg.moe_layers), cfg.num_local_experts, group.gpus_per_node,
                               s.nodes_per_replica, redundant=s.redundant_experts)
    except (OSError, PlacementError) as e:
        raise ClusterFileError(f"serving.placement_file: {s.placement_file!r} {e}; fix the file or remove the "
                               "key") from None
    return pm, s.placement_file or "contiguous"


def _busiest_worker_copies(pm: PlacementMap) -> int:
    return max((sum(len(pm.experts_on(r, layer)) for layer in pm.moe_layers) for r in range(pm.num_workers)),
               default=0)


def _cost(spec: ClusterSpec, throughput: float | None) -> Cost:
    missing = [f"node_groups[{i}] ({g.name})" for i, g in enumerate(spec.node_groups) if g.price_per_hour is None]
    if spec.provider.cloud != "local" and spec.head.price_per_hour is None:
        missing.append("head")
    if missing:
        return Cost(None, missing, throughput)
    per_hour = sum(g.price_per_hour * g.count for g in spec.node_groups) + (spec.head.price_per_hour or 0.0)
    if not throughput:
        return Cost(per_hour, [])
    per_m = per_hour / (throughput * 3600) * 1e6
    assumption = (f"estimate: assumes a sustained {throughput:g} generated+prompt tokens/s over the whole cluster, "
                  "every node billed every hour, no idle time")
    return Cost(per_hour, [], throughput, per_m, assumption)


# ---- verdict and fixes ---------------------------------------------------------------------------------------

def _fits(cfg: TextConfig, layout: Layout) -> bool:
    mem, kv = memory(cfg, layout)
    return mem.kv_budget > 0 and kv.sequences_per_node >= 1


def _copies(cfg: TextConfig, nodes: int, gpus: int, redundant: int) -> int:
    slots = max(1, cfg.num_local_experts) + redundant
    return math.ceil(slots / (nodes * gpus)) * cfg.num_moe_layers


def _min_nodes(cfg: TextConfig, layout: Layout, redundant: int, limit: int = 16, **change) -> int | None:
    """Fewest nodes per replica (with experts dividing evenly) at which `layout`+`change` fits."""
    base = replace(layout, **change)
    for n in range(1, limit + 1):
        slots = max(1, cfg.num_local_experts) + redundant
        if cfg.num_local_experts and slots % (n * base.gpus_per_node):
            continue
        trial = replace(base, nodes_per_replica=n,
                        expert_copies_per_gpu=_copies(cfg, n, base.gpus_per_node, redundant))
        if _fits(cfg, trial):
            return n
    return None


def _verdict(spec: ClusterSpec, cfg: TextConfig, layout: Layout, mem: GpuMemory, kv: KVCapacity):
    s, group = spec.serving, spec.serving_group
    gi = spec.node_groups.index(group)
    reasons: list[str] = []
    fixes: list[str] = []
    warnings: list[str] = []
    need = s.replicas * s.nodes_per_replica
    if need > group.count:
        reasons.append(f"{s.replicas} replica(s) x {s.nodes_per_replica} node(s) need {need} nodes but "
                       f"node_groups[{gi}] ({group.name}) has {group.count}")
        fixes.append(f"set node_groups[{gi}].count to {need}, or lower serving.replicas to "
                     f"{max(1, group.count // s.nodes_per_replica)}")
    unit = "GPU" if not group.kind.is_cpu else "worker"
    if mem.weights + mem.reserve > mem.usable:
        reasons.append(f"weights need {mem.weights / GB:.1f} GB per {unit} ({mem.non_expert / GB:.1f} non-expert + "
                       f"{mem.routed_experts / GB:.1f} routed experts + {mem.vision / GB:.1f} vision) plus {mem.reserve / GB:.1f} GB runtime reserve, "
                       f"but only {mem.usable / GB:.1f} GB is usable ({s.gpu_memory_fraction:.0%} of "
                       f"{mem.total / GB:.1f} GB)")
        _weight_fixes(spec, cfg, layout, fixes, gi)
    elif kv.sequences_per_node < 1:
        reasons.append(f"the KV cache ({max(0.0, mem.kv_budget) / GB:.2f} GB per {unit}) cannot hold one "
                       f"{s.max_context_len}-token sequence per node (longest that fits: "
                       f"{kv.longest_context_per_node} tokens)")
        _kv_fixes(spec, cfg, layout, kv, fixes, gi)
    if not reasons and kv.sequences_per_replica < s.max_concurrent_sequences:
        warnings.append(
            f"at full context ({s.max_context_len} tokens) the cache holds {kv.sequences_per_replica} sequences per "
            f"replica, fewer than serving.max_concurrent_sequences ({s.max_concurrent_sequences}); all "
            f"{s.max_concurrent_sequences} fit when each is at most {kv.context_for_target} tokens, else requests "
            "wait for cache space")
    images = _vision(spec, cfg)["image_tokens_per_request_max"]
    if images >= s.max_context_len:
        warnings.append(f"a request with serving.images.max_per_request ({s.images.max_per_request}) full-size "
                        f"images takes {images} prompt tokens, more than max_context_len ({s.max_context_len}): "
                        "such requests get a 400; lower serving.images.max_per_request or raise max_context_len")
    if spec.model.weight_dtype in ("fp8", "int4"):
        warnings.append(f"weight_dtype {spec.model.weight_dtype} is planned, but the herd engine serves bf16/fp32 "
                        "weights only today: herd render --target serve will refuse it")
    if spec.model.kv_cache_dtype == "fp8":
        warnings.append("kv_cache_dtype fp8 is planned, but the herd engine keeps the KV cache in the weights' dtype "
                        "(bf16/fp32) today: herd render --target serve will refuse it")
    return reasons, fixes, warnings


def _weight_fixes(spec: ClusterSpec, cfg: TextConfig, layout: Layout, fixes: list[str], gi: int) -> None:
    s = spec.serving
    n = _min_nodes(cfg, layout, s.redundant_experts)
    if n is not None and n > s.nodes_per_replica:
        fixes.append(f"add nodes: set serving.nodes_per_replica to {n} (and node_groups[{gi}].count to at least "
                     f"{n * s.replicas})")
    order = ["fp32", "bf16", "fp8", "int4"]
    for dtype in order[order.index(layout.weight_dtype) + 1:]:
        m = _min_nodes(cfg, layout, s.redundant_experts, weight_dtype=dtype)
        if m is not None:
            fixes.append(f"use a smaller weight dtype: set model.weight_dtype to {dtype} (fits on {m} node(s) per "
                         f"replica{'; the engine serves bf16/fp32 only today' if dtype in ('fp8', 'int4') else ''})")
            break
    current = spec.serving_group.memory_per_gpu()
    for kind in GPU_KINDS.values():
        if kind.is_cpu or kind.memory_bytes <= current:
            continue
        m = _min_nodes(cfg, layout, s.redundant_experts, memory_per_gpu=float(kind.memory_bytes))
        if m is not None and (n is None or m < n):
            fixes.append(f"use bigger GPUs: node_groups[{gi}].gpu {kind.name} fits on {m} node(s) per replica")
            break
    if not fixes:
        fixes.append("no layout of up to 16 nodes fits this model at this dtype; use more GPUs per node or int4")


def _kv_fixes(spec: ClusterSpec, cfg: TextConfig, layout: Layout, kv: KVCapacity, fixes: list[str], gi: int) -> None:
    s = spec.serving
    if kv.longest_context_per_node >= 16:
        fixes.append(f"lower the context: set serving.max_context_len to {kv.longest_context_per_node} or less")
    if layout.kv_dtype != "fp8" and _fits(cfg, replace(layout, kv_dtype="fp8")):
        fixes.append("halve the cache: set model.kv_cache_dtype to fp8 (planned; the engine keeps a bf16/fp32 cache "
                     "today)")
    if layout.fraction < 0.95 and _fits(cfg, replace(layout, fraction=0.95)):
        fixes.append("set serving.gpu_memory_fraction to 0.95")
    n = _min_nodes(cfg, layout, s.redundant_experts)
    if n is not None and n > s.nodes_per_replica:
        fixes.append(f"add nodes: set serving.nodes_per_replica to {n} (and node_groups[{gi}].count to at least "
                     f"{n * s.replicas}; fewer experts per GPU leaves more cache)")


def _worker_blocks(pm: PlacementMap, gpus: bool) -> list[dict]:
    """Per worker: where it is and which experts it holds on the first MoE layer (all layers if uniform)."""
    layer = pm.moe_layers[0] if pm.moe_layers else None
    out = []
    for node in range(pm.nodes):
        for w in range(pm.workers_per_node[node]):
            r = pm.rank(node, w)
            out.append({"rank": r, "node": node, ("gpu" if gpus else "worker"): w,
                        "experts": pm.experts_on(r, layer) if layer is not None else []})
    return out

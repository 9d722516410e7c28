"""The engine's Executor over an expert-parallel group: `LLMEngine.from_pretrained(..., expert_parallel_size=N)`.

The engine core (scheduler, sampling, detokenization) is the single-process one; only this executor differs.
Each step it splits the chunks by node (a sequence stays on the node that first took it; attention and KV
cache are data-parallel across nodes), sends every worker its node's chunks in ONE Ray call, and collects
the logits from each node's first worker. Within the step the workers meet only through collectives.

A worker that dies or stops answering turns the step into `serving.engine.errors.WorkerDiedError`; the engine
fails the requests in flight and calls `rebuild()`, which replaces every worker on the same reserved bundles.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from serving.expert_parallel.group import ExpertParallelGroup, GroupSpec, WorkerDied
from serving.expert_parallel.shard_runner import ShardSpec
from serving.expert_parallel.worker import EPWorker


def resolve_placement(placement, cfg, spec: GroupSpec):
    """A PlacementMap (given, loaded from a JSON path, or the contiguous default), checked against the layout."""
    from cluster.placement import PlacementMap

    if placement is None:
        return PlacementMap.contiguous(list(cfg.moe_layers), cfg.num_local_experts, spec.tensor_parallel_size,
                                       nodes=spec.num_nodes)
    if isinstance(placement, (str, Path)):
        placement = PlacementMap.load(placement)
    want = [spec.tensor_parallel_size] * spec.num_nodes
    if list(placement.workers_per_node) != want:
        raise ValueError(f"placement has workers_per_node {list(placement.workers_per_node)} but the group is "
                         f"{spec.num_nodes} nodes x {spec.tensor_parallel_size} workers ({want}); plan the placement "
                         f"for expert_parallel_size={spec.expert_parallel_size}, "
                         f"tensor_parallel_size={spec.tensor_parallel_size}")
    if placement.num_experts != cfg.num_local_experts or sorted(placement.moe_layers) != sorted(cfg.moe_layers):
        raise ValueError(f"placement is for {placement.num_experts} experts on layers {placement.moe_layers}, "
                         f"the model has {cfg.num_local_experts} on {list(cfg.moe_layers)}; it was planned for "
                         f"another model")
    return placement


class EPExecutor:
    """Executor (serving.engine.executor) whose model runs on the workers of an ExpertParallelGroup."""

    def __init__(self, group: ExpertParallelGroup, shard_spec: ShardSpec, max_num_seqs: int, max_model_len: int,
                 step_timeout_s: float = 60.0, load_timeout_s: float = 300.0, counts_sync_interval_s: float = 1.0):
        from cluster.placement import PlacementMap

        self.group = group
        self.shard_spec = shard_spec
        self.expert_placement = PlacementMap.from_json(shard_spec.placement_json)  # which worker holds which expert
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.nodes = group.spec.num_nodes
        self.vocab_size = int((shard_spec.config.get("text_config") or shard_spec.config)["vocab_size"])
        self.tp = group.spec.tensor_parallel_size
        self.step_timeout_s, self.load_timeout_s = step_timeout_s, load_timeout_s
        self.worker_bytes: list[dict] = []  # per rank, from the latest load
        self.load_history: list[list[dict]] = []  # every load's worker_bytes (first load, then each rebuild)
        self._node_of: dict[int, int] = {}  # seq_id -> node whose cache holds it
        self._to_free: list[list[int]] = [[] for _ in range(self.nodes)]
        # Routing counts outlive rebuilds: the node leaders send theirs with a step at most every
        # `counts_sync_interval_s`; a rebuild adds the last copies to the counts carried over from earlier loads.
        self.counts_sync_interval_s = counts_sync_interval_s
        self._counts_carried: torch.Tensor | None = None
        self._counts_seen: list[torch.Tensor | None] = [None] * self.nodes
        self._counts_synced_at = float("-inf")
        self._load()

    def _load(self) -> None:
        self.worker_bytes = self.group.call("load", self.shard_spec, timeout=self.load_timeout_s)
        self.load_history.append(self.worker_bytes)
        self._node_of.clear()
        self._to_free = [[] for _ in range(self.nodes)]
        self._counts_seen = [None] * self.nodes

    # ---- Executor interface ------------------------------------------------------------------------------
    def execute(self, chunks: list) -> torch.Tensor:
        per_node: list[list] = [[] for _ in range(self.nodes)]
        order: list[tuple[int, int]] = []  # (node, index among that node's logits) per need_logits chunk
        counts = [0] * self.nodes
        for c in chunks:
            end = c.start_pos + len(c.token_ids)
            if end > self.max_model_len:
                raise ValueError(f"sequence {c.seq_id} reaches position {end}, beyond max_model_len "
                                 f"({self.max_model_len})")
            node = self._node_for(c.seq_id)
            per_node[node].append(c)
            if c.need_logits:
                order.append((node, counts[node]))
                counts[node] += 1
        frees, self._to_free = self._to_free, [[] for _ in range(self.nodes)]
        sync = time.monotonic() - self._counts_synced_at >= self.counts_sync_interval_s
        try:
            refs = [w.execute.remote(per_node[rank // self.tp], bool(per_node[rank // self.tp]), frees[rank // self.tp],
                                     sync and rank % self.tp == 0)
                    for rank, w in enumerate(self.group.workers)]
            out = self.group.gather(refs, list(range(len(refs))), timeout=self.step_timeout_s)
        except WorkerDied as err:
            from serving.engine.errors import WorkerDiedError

            raise WorkerDiedError(str(err)) from err
        node_logits = [out[n * self.tp][0] for n in range(self.nodes)]
        if sync:
            self._counts_seen = [out[n * self.tp][1] for n in range(self.nodes)]
            self._counts_synced_at = time.monotonic()
        if not order:
            return torch.empty(0, self.vocab_size, dtype=torch.float32)
        return torch.cat([node_logits[n][i:i + 1] for n, i in order])

    def _node_for(self, seq_id: int) -> int:
        node = self._node_of.get(seq_id)
        if node is None:  # a new sequence goes to the node holding the fewest
            load = [0] * self.nodes
            for n in self._node_of.values():
                load[n] += 1
            node = min(range(self.nodes), key=lambda n: load[n])
            if load[node] >= self.shard_spec.slots_per_node:
                raise RuntimeError(f"no free KV-cache slot for sequence {seq_id}: all nodes are full "
                                   f"({self.shard_spec.slots_per_node} slots each)")
            self._node_of[seq_id] = node
        return node

    def free(self, seq_id: int) -> None:
        node = self._node_of.pop(seq_id, None)
        if node is not None:
            self._to_free[node].append(seq_id)  # sent with the next step, saving a Ray call per sequence

    def routed_token_counts(self) -> torch.Tensor:
        """Tokens routed per (MoE layer, expert), summed over nodes (each node's first worker counts them) and
        over earlier loads: a rebuild keeps what the replaced workers had reported (all but at most the last
        `counts_sync_interval_s` before the failure)."""
        counts = self.group.call("routed_token_counts", ranks=[n * self.tp for n in range(self.nodes)],
                                 timeout=self.step_timeout_s)
        total = torch.stack(counts).sum(0)
        return total if self._counts_carried is None else total + self._counts_carried

    def exchange_times(self) -> list[dict]:
        """Seconds each worker spent in dispatch / compute / combine, cumulative."""
        return self.group.call("exchange_times", timeout=self.step_timeout_s)

    def kv_cache_usage(self) -> float:
        return len(self._node_of) / self.max_num_seqs

    def rebuild(self) -> None:
        """Replace every worker (same bundles, fresh process groups) and reload; all sequences are forgotten."""
        seen = [c for c in self._counts_seen if c is not None]
        if seen:
            last = torch.stack(seen).sum(0)
            self._counts_carried = last if self._counts_carried is None else self._counts_carried + last
            self._counts_seen = [None] * self.nodes  # carried once, even if the restart below fails and is retried
        self.group.restart()
        self._load()

    def shutdown(self) -> None:
        self.group.shutdown()

    @property
    def placement(self) -> list[dict]:
        """Per rank: the Ray node id, IP and pid of its worker."""
        return self.group.placement


def build_ep_executor(path, cfg, dtype: str = "float32", device: str = "cpu", expert_parallel_size: int = 2,
                      tensor_parallel_size: int = 1, placement=None, placement_group=None, nodes=None,
                      max_num_seqs: int = 32, max_model_len: int = 4096, kv_cache_memory_bytes=None,
                      weights: str | None = None, s3_endpoint_url: str | None = None, cache_dir: str | None = None,
                      num_cpus_per_worker: float = 0.5, num_gpus_per_worker: float | None = None,
                      num_threads_per_worker: int = 1, step_timeout_s: float = 60.0,
                      worker_env: dict[str, str] | None = None, counts_sync_interval_s: float = 1.0,
                      lora_adapter=None) -> EPExecutor:
    """Start the group on the running Ray cluster (or a local one) and load each worker's share.

    path: the checkpoint folder the engine reads config and tokenizer from; `weights` (default: path) is where
    workers read tensors: a folder every node can see, or `s3://bucket/prefix` (byte ranges, node-local cache
    in `cache_dir`). nodes: custom resource names pinning each node's workers (tests, fixed plans).
    device: "cpu" (gloo between workers) or "cuda" (one GPU per worker, NCCL; Ray picks each worker's GPU).
    kv_cache_memory_bytes: the KV-cache budget of EACH worker (each holds its node's cache for its 1/tp of the
    KV heads), as the cluster planner sizes it per GPU; the slots it holds cap max_num_seqs.
    lora_adapter: a PEFT LoRA adapter folder every node can read; each worker merges its share as it loads.
    worker_env: environment variables for the workers (e.g. S3 credentials where nodes have no instance role;
    nothing is copied from the driver's environment implicitly).
    """
    import ray

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: expert-parallel workers run on 'cpu' or 'cuda' (Ray gives each "
                         "worker its own GPU, so name no index)")
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1.0 if device == "cuda" else 0.0
    if device == "cuda" and num_gpus_per_worker <= 0:
        raise ValueError("device='cuda' needs num_gpus_per_worker > 0 (1: one GPU per worker), else Ray gives "
                         "the workers no GPU")
    if expert_parallel_size < tensor_parallel_size:
        raise ValueError(f"expert_parallel_size ({expert_parallel_size}) counts every worker of the replica and "
                         f"tensor_parallel_size ({tensor_parallel_size}) the workers per node: use "
                         f"expert_parallel_size={tensor_parallel_size} for one node")
    for what, n in (("num_key_value_heads", cfg.num_key_value_heads), ("intermediate_size", cfg.intermediate_size),
                    ("intermediate_size_mlp", cfg.intermediate_size_mlp)):
        if n % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size ({tensor_parallel_size}) must divide the model's {what} ({n}): "
                             f"a node's workers split it evenly; choose a divisor of {n}")
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    spec = GroupSpec(expert_parallel_size, tensor_parallel_size, nodes=list(nodes) if nodes else None,
                     num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, placement_group=placement_group,
                     collective_timeout_s=step_timeout_s, env=dict(worker_env or {}))
    _check_gpus(spec)
    if lora_adapter is not None:  # refuse a bad adapter here, not in every worker
        from serving.lora import LoraAdapter

        lora_adapter = str(Path(lora_adapter).resolve())
        LoraAdapter.load(lora_adapter)
    placement = resolve_placement(placement, cfg, spec)
    raw_config = json.loads((Path(path) / "config.json").read_text())
    slots_per_node = node_slots(cfg, dtype, max_model_len, max_num_seqs, spec, kv_cache_memory_bytes)
    max_num_seqs = min(max_num_seqs, slots_per_node * spec.num_nodes)
    shard_spec = ShardSpec(str(weights or path), raw_config, dtype, placement.to_json(), slots_per_node,
                           max_model_len, s3_endpoint_url, cache_dir or str(Path(tempfile.gettempdir()) / "herd-s3"),
                           lora_adapter)
    group = ExpertParallelGroup(spec, EPWorker, {"num_threads": num_threads_per_worker, "device": device}).start()
    try:
        return EPExecutor(group, shard_spec, max_num_seqs, max_model_len, step_timeout_s=step_timeout_s,
                          counts_sync_interval_s=counts_sync_interval_s)
    except BaseException:
        group.shutdown()
        raise


def node_slots(cfg, dtype: str, max_model_len: int, max_num_seqs: int, spec: GroupSpec,
               kv_cache_memory_bytes: float | None = None) -> int:
    """KV-cache slots per node: max_num_seqs spread over the nodes, capped by what a worker's budget holds.

    A node's sequences live in its own cache, each of its `tp` workers holding 1/tp of the KV heads, so one
    sequence costs a worker 1/tp of what it costs the single-process engine.
    """
    from serving.engine.kv_cache import plan_kv_cache
    from serving.loader import resolve_dtype

    slots = -(-max_num_seqs // spec.num_nodes)
    per_seq = plan_kv_cache(cfg, max_model_len, resolve_dtype(dtype), 1).bytes_per_sequence / spec.tensor_parallel_size
    if kv_cache_memory_bytes is not None:
        fit = int(kv_cache_memory_bytes // per_seq)
        if fit < 1:
            raise ValueError(f"kv_cache_memory_bytes ({int(kv_cache_memory_bytes)}, per worker) cannot hold one "
                             f"sequence of max_model_len={max_model_len} tokens ({int(per_seq)} bytes per worker "
                             f"at tensor_parallel_size={spec.tensor_parallel_size}); raise the budget or lower "
                             "max_model_len")
        slots = min(slots, fit)
    return slots


def _check_gpus(spec: GroupSpec) -> None:
    """Fail at once, not after the placement timeout, when the workers' GPUs cannot exist."""
    import ray

    if not spec.num_gpus:
        return
    if spec.placement_group is not None:
        bundles = spec.placement_group.bundle_specs[-spec.expert_parallel_size:]
        short = [i for i, b in enumerate(bundles) if b.get("GPU", 0) < spec.num_gpus]
        if short:
            raise ValueError(f"the given placement group's worker bundles {short} hold no GPU (or less than "
                             f"num_gpus_per_worker={spec.num_gpus}); reserve GPU bundles (Serve: worker_num_gpus)")
        return
    need, have = spec.num_gpus * spec.expert_parallel_size, ray.cluster_resources().get("GPU", 0)
    if have < need:
        raise ValueError(f"device='cuda' with expert_parallel_size={spec.expert_parallel_size} needs {need:g} GPUs "
                         f"({spec.num_gpus:g} per worker) but the Ray cluster has {have:g}; add GPU nodes or use "
                         "device='cpu'")

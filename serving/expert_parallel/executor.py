"""The engine's Executor over an expert-parallel group: `LLMEngine.from_pretrained(..., expert_parallel_size=N)`.

The engine core (scheduler, sampling, detokenization) is the single-process one; only this executor differs.
Each step it splits the chunks by node (a sequence stays on the node that first took it; attention and KV
cache are data-parallel across nodes), sends every worker its node's chunks in ONE Ray call, and collects
the logits from each node's first worker. Within the step the workers meet only through collectives.

A worker that dies or stops answering turns the step into `serving.engine.errors.WorkerDiedError`; the engine
fails the requests in flight and calls `rebuild()`, which replaces every worker on the same reserved bundles.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from serving.expert_parallel.group import ExpertParallelGroup, GroupSpec, WorkerDied
from serving.expert_parallel.shard_runner import ShardSpec
from serving.expert_parallel.worker import EPWorker


class EPExecutor:
    """Executor (serving.engine.executor) whose model runs on the workers of an ExpertParallelGroup."""

    def __init__(self, group: ExpertParallelGroup, shard_spec: ShardSpec, max_model_len: int,
                 step_timeout_s: float = 60.0, load_timeout_s: float = 300.0, counts_sync_interval_s: float = 1.0):
        from cluster.placement import PlacementMap

        self.group = group
        self.shard_spec = shard_spec
        self.expert_placement = PlacementMap.from_json(shard_spec.placement_json)  # which worker holds which expert
        self.kv_plan = shard_spec.kv_plan  # each node's pools (its workers hold 1/tp of every block)
        self.max_model_len = max_model_len
        self.nodes = self.num_nodes = group.spec.num_nodes
        self.vocab_size = int((shard_spec.config.get("text_config") or shard_spec.config)["vocab_size"])
        self.tp = group.spec.tensor_parallel_size
        self.step_timeout_s, self.load_timeout_s = step_timeout_s, load_timeout_s
        self.worker_bytes: list[dict] = []  # per rank, from the latest load
        self.load_history: list[list[dict]] = []  # every load's worker_bytes (first load, then each rebuild)
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
        self._counts_seen = [None] * self.nodes

    # ---- Executor interface ------------------------------------------------------------------------------
    def execute(self, chunks: list) -> torch.Tensor:
        per_node: list[list] = [[] for _ in range(self.nodes)]
        order: list[tuple[int, int]] = []  # (node, index among that node's logits) per logits row
        counts = [0] * self.nodes
        for c in chunks:
            end = c.start_pos + len(c.token_ids)
            if end > self.max_model_len:
                raise ValueError(f"sequence {c.seq_id} reaches position {end}, beyond max_model_len "
                                 f"({self.max_model_len})")
            node = c.node  # the engine's block manager placed the sequence (its blocks live on that node)
            per_node[node].append(c)
            for _ in range(c.num_logits if c.need_logits else 0):
                order.append((node, counts[node]))
                counts[node] += 1
        sync = time.monotonic() - self._counts_synced_at >= self.counts_sync_interval_s
        if self.tp > 1 and any(c.mm_embeds is not None for c in chunks):
            import ray

            # Image rows are large: put each node's chunks in the object store once for its tp ranks, rather
            # than serialising them into every rank's call. (Text-only chunks are small; a put would cost more.)
            per_node = [ray.put(p) if p else p for p in per_node]
        try:
            refs = [w.execute.remote(per_node[rank // self.tp], bool(per_node[rank // self.tp]),
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

    def rebuild(self) -> None:
        """Replace every worker (same bundles, fresh process groups) and reload; their caches start empty (the
        engine resets its block manager)."""
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


def build_ep_executor(config) -> EPExecutor:
    """Start the group for a `serving.config.EngineConfig` on the running Ray cluster (or a local one) and load
    each worker's share. The config was validated when it was built; this only places and loads.

    Weights: `model.weights` (default: the checkpoint folder) is where workers read tensors: a folder every node
    can see, or `s3://bucket/prefix` (byte ranges, node-local cache under `model.cache_dir`). The KV budget
    (`cache.kv_cache_memory_bytes`) is EACH worker's, as the cluster planner sizes it per GPU. A LoRA adapter must be on a path every node can read; each worker merges its share.
    `parallel.worker_env` sets the workers' environment (e.g. S3 credentials where nodes have no instance role;
    nothing is copied from the driver's environment implicitly).
    """
    import ray

    from cluster.placement import PlacementError, resolve_placement
    from serving.expert_parallel.s3 import cache_root

    m, par = config.model, config.parallel
    cfg = m.text
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    spec = GroupSpec(par.expert_parallel_size, par.tensor_parallel_size, nodes=list(par.nodes) if par.nodes else None,
                     num_cpus=par.num_cpus_per_worker, num_gpus=par.gpus_per_worker(m.device),
                     placement_group=par.placement_group, collective_timeout_s=par.step_timeout_s,
                     env=dict(par.worker_env), bundles=par.worker_bundles(m.device))
    _check_gpus(spec)
    lora_adapter = None
    if m.lora_adapter is not None:  # refuse a bad adapter here, not in every worker
        from serving.lora import LoraAdapter

        lora_adapter = str(Path(m.lora_adapter).resolve())
        LoraAdapter.load(lora_adapter)
    try:
        placement = resolve_placement(par.placement, list(cfg.moe_layers), cfg.num_local_experts,
                                      par.tensor_parallel_size, par.num_nodes)
    except PlacementError as e:
        raise PlacementError(f"placement {e}") from None
    shard_spec = ShardSpec(m.weights_source, m.raw, m.dtype, placement.to_json(), node_kv_plan(config),
                           config.cache.max_model_len, m.s3_endpoint_url,
                           m.cache_dir or str(cache_root() / "s3"), lora_adapter)
    group = ExpertParallelGroup(spec, EPWorker, {"num_threads": par.num_threads_per_worker, "device": m.device}).start()
    try:
        return EPExecutor(group, shard_spec, config.cache.max_model_len,
                          step_timeout_s=par.step_timeout_s, counts_sync_interval_s=par.counts_sync_interval_s)
    except BaseException:
        group.shutdown()
        raise


def node_kv_plan(config):
    """One node's KV-cache pools: its share of max_num_seqs, or what each worker's budget holds (a worker keeps
    1/tp of the KV heads of every block, so the same budget holds tp times the blocks)."""
    from serving.engine.kv_cache import plan_kv_cache
    from serving.loader import resolve_dtype

    par, c = config.parallel, config.cache
    return plan_kv_cache(config.model.text, c.max_model_len, resolve_dtype(config.model.dtype),
                         -(-config.scheduler.max_num_seqs // par.num_nodes), c.kv_cache_memory_bytes,
                         tensor_parallel_size=par.tensor_parallel_size, block_size=c.block_size,
                         mean_sequence_tokens=c.mean_sequence_tokens)


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

"""The expert-parallel group: a Ray placement group, one worker actor per bundle, torch.distributed among them.

Layout (the same one the cluster planner plans): `expert_parallel_size` workers in total, `tensor_parallel_size`
per node, node-major ranks (node 0's workers first). Workers of one node shard the non-expert weights between
them (tensor parallelism, their own process group); all workers share the routed experts (the expert group).

Placement: one bundle per worker. With `nodes=["node0", "node1"]` (custom resources naming the plan's nodes)
each bundle also asks for a sliver of its node's resource, which pins it there; otherwise bundles are PACKed
and ranks follow the nodes Ray chose. Given an existing placement group (a Serve replica's), its last
`expert_parallel_size` bundles are used instead of reserving new ones (bundle 0 is the replica's own).

Nothing waits forever: placement, actor calls and collectives all carry timeouts, and a dead worker surfaces
as `WorkerDied` naming its rank and node.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


class WorkerDied(RuntimeError):
    """A worker of the group died or stopped answering; the message names its rank and node."""


@dataclass
class GroupSpec:
    """How many workers, how they sit on nodes, what each reserves."""

    expert_parallel_size: int
    tensor_parallel_size: int = 1  # workers per node
    nodes: list[str] | None = None  # custom resource per node, pins each node's bundles (tests, fixed plans)
    num_cpus: float = 0.5  # per worker; fractional so several share a small test machine
    num_gpus: float = 0.0
    placement_group: object = None  # an existing placement group to use (e.g. a Serve replica's)
    ready_timeout_s: float = 180.0  # reserving bundles and starting workers (a loaded host starts them slowly)
    collective_timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    bundles: list[dict] | None = None  # one per worker (serving.config.ParallelConfig.worker_bundles), rank order

    def __post_init__(self) -> None:
        from serving.config import check_layout

        check_layout(self.expert_parallel_size, self.tensor_parallel_size,
                     num_nodes_listed=len(self.nodes) if self.nodes is not None else None, redundant_experts=None)

    @property
    def num_nodes(self) -> int:
        return self.expert_parallel_size // self.tensor_parallel_size

    def node_of(self, rank: int) -> int:
        return rank // self.tensor_parallel_size


class ExpertParallelGroup:
    """Starts the workers of one replica and calls methods on all of them with a timeout."""

    def __init__(self, spec: GroupSpec, worker_cls, worker_kwargs: dict | None = None):
        self.spec = spec
        self.worker_cls = worker_cls
        self.worker_kwargs = worker_kwargs or {}
        self.workers: list = []
        self.placement: list[dict] = []  # per rank: node_id, ip, pid
        self._pg = None
        self._own_pg = False
        self._bundles: list[int] = []

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> "ExpertParallelGroup":
        self._reserve()
        try:
            return self._start_workers()
        except BaseException:  # release the actors and the placement group we reserved, then report
            self.shutdown()
            raise

    def _start_workers(self) -> "ExpertParallelGroup":
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_cls = ray.remote(self.worker_cls)
        s = self.spec
        self.workers = [
            actor_cls.options(
                num_cpus=s.num_cpus, num_gpus=s.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=b),
                runtime_env={"env_vars": dict(s.env)} if s.env else None,
            ).remote(rank=r, world_size=s.expert_parallel_size, tp_size=s.tensor_parallel_size,
                     **self.worker_kwargs)
            for r, b in enumerate(self._bundles)
        ]
        self.placement = self.call("where", timeout=s.ready_timeout_s)
        addr = self.placement[0]["ip"]
        port = ray.get(self.workers[0].free_port.remote(), timeout=s.ready_timeout_s)
        self.call("init_distributed", addr, port, s.collective_timeout_s, timeout=s.ready_timeout_s)
        return self

    def shutdown(self, keep_placement_group: bool = False) -> None:
        """Kill the workers; release the placement group if this group reserved it."""
        import ray

        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead: nothing to release
                pass
        self.workers = []
        if self._own_pg and self._pg is not None and not keep_placement_group:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None

    def restart(self) -> "ExpertParallelGroup":
        """Replace every worker (after one died) on the same reserved bundles, with fresh process groups."""
        self.shutdown(keep_placement_group=True)
        return self.start()

    # ---- calls ---------------------------------------------------------------------------------------------
    def call(self, method: str, *args, timeout: float | None = None, ranks: list[int] | None = None, **kwargs):
        """`method(*args)` on every worker (or `ranks`), results in rank order; a dead worker -> WorkerDied."""
        ranks = list(range(len(self.workers))) if ranks is None else ranks
        refs = [getattr(self.workers[r], method).remote(*args, **kwargs) for r in ranks]
        return self.gather(refs, ranks, timeout)

    def gather(self, refs: list, ranks: list[int], timeout: float | None = None) -> list:
        """ray.get for many refs that fails as soon as ANY fails (peers of a dead worker may be blocked)."""
        import ray

        timeout = self.spec.collective_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = dict(zip(refs, ranks))
        results = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not done:
                stuck = sorted(pending.values())
                raise WorkerDied(f"expert-parallel workers {stuck} did not answer within {timeout:.0f}s")
            ref = done[0]
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except Exception as err:
                raise self._root_cause({rank: err}, pending) from err
        return [results[r] for r in ranks]

    def _root_cause(self, errors: dict, pending: dict, grace_s: float = 2.0) -> WorkerDied:
        """The error to report: a dead worker rather than the peers whose collectives broke because of it."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=grace_s) if pending else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except Exception as err:
                errors[pending[ref]] = err
        dead = sorted(r for r, e in errors.items() if isinstance(e, (RayActorError, GetTimeoutError)))
        if dead:
            return WorkerDied(f"expert-parallel worker {dead[0]} ({self._where(dead[0])}) died: "
                              f"{type(errors[dead[0]]).__name__}")
        rank = min(errors)
        cause = getattr(errors[rank], "cause", errors[rank])
        return WorkerDied(f"expert-parallel worker {rank} ({self._where(rank)}) failed: {cause!r}")

    def _where(self, rank: int) -> str:
        if rank < len(self.placement):
            p = self.placement[rank]
            return f"node {self.spec.node_of(rank)}, ray node {p['node_id'][:8]}, pid {p['pid']}"
        return f"node {self.spec.node_of(rank)}"

    # ---- placement -----------------------------------------------------------------------------------------
    def _reserve(self) -> None:
        """Reserve (or adopt) one bundle per worker and order the bundles node-major."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        s = self.spec
        n = s.expert_parallel_size
        if self._pg is None and s.placement_group is not None:
            self._pg = s.placement_group
            total = len(self._pg.bundle_specs)
            if total < n:
                raise ValueError(f"the given placement group has {total} bundles; expert_parallel_size={n} "
                                 f"needs {n} (one per worker), plus one for the caller if it sits in it")
            self._bundles = list(range(total - n, total))
        elif self._pg is None:
            if s.bundles is None:
                from serving.config import ParallelConfig

                par = ParallelConfig(n, s.tensor_parallel_size, tuple(s.nodes) if s.nodes else None,
                                     num_cpus_per_worker=s.num_cpus, num_gpus_per_worker=s.num_gpus)
                bundles = par.worker_bundles("cuda" if s.num_gpus else "cpu")
            else:
                bundles = s.bundles
            self._pg = placement_group(bundles, strategy="PACK", name=f"herd-ep-{id(self):x}")
            self._own_pg = True
            self._bundles = list(range(n))
        try:
            ray.get(self._pg.ready(), timeout=s.ready_timeout_s)
        except Exception as err:
            want = self._pg.bundle_specs[self._bundles[0]]
            self.shutdown()
            raise RuntimeError(f"could not reserve {n} expert-parallel workers ({want} each"
                               f"{', on nodes ' + str(s.nodes) if s.nodes else ''}) within "
                               f"{s.ready_timeout_s:.0f}s: the cluster lacks the resources "
                               f"(check `ray status`)") from err
        if not s.nodes:
            # Ranks follow the nodes Ray chose, so that a node's workers are consecutive (one TP group).
            where = placement_group_table(self._pg)["bundles_to_node_id"]
            self._bundles.sort(key=lambda b: (where.get(b, ""), b))

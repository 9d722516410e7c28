"""One expert-parallel worker (a Ray actor): joins the process groups, loads its share of the model, runs steps.

The group (group.py) creates one per GPU, or per CPU slot in tests, and calls the same method on all of them
for every engine step; inside, the workers meet only through torch.distributed collectives (all-reduce within a
node for tensor parallelism, all-to-all across nodes for the experts), never through Ray calls, which cost
several times more per layer.
"""
from __future__ import annotations

import os
import socket


class EPWorker:
    """Process-level state of one worker: rank, process groups, and (after `load`) a model shard."""

    def __init__(self, rank: int, world_size: int, tp_size: int, num_threads: int = 1, **model_kwargs):
        import torch

        torch.set_num_threads(num_threads)  # workers share the cores; 1 each unless the CPU budget allows more
        self.rank, self.world_size, self.tp_size = rank, world_size, tp_size
        self.node = rank // tp_size
        self.tp_rank = rank % tp_size
        self.model_kwargs = model_kwargs
        self.tp_group = None
        self.runner = None  # serving.expert_parallel.shard_runner.ShardRunner, after load()

    # ---- placement and wiring ------------------------------------------------------------------------------
    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "resources": {k: v for k, v in ctx.get_assigned_resources().items()}}

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((self.where()["ip"], 0))
            return s.getsockname()[1]

    def init_distributed(self, addr: str, port: int, timeout_s: float) -> None:
        """Join the expert group (all workers) and this node's tensor-parallel group, gloo on CPU."""
        from datetime import timedelta

        import torch.distributed as dist

        if addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep traffic on loopback
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=timeout)
        # Every rank must create every subgroup, in the same order.
        for node in range(self.world_size // self.tp_size):
            ranks = list(range(node * self.tp_size, (node + 1) * self.tp_size))
            g = dist.new_group(ranks, timeout=timeout, backend="gloo")
            if node == self.node:
                self.tp_group = g

    def cpu_seconds(self) -> float:
        """CPU time this worker process has used (all threads): cost per token regardless of contention."""
        import time

        return time.process_time()

    def run(self, fn, *args, **kwargs):
        """Run `fn(self, *args, **kwargs)` here (benchmarks and layer trials ship their code this way)."""
        return fn(self, *args, **kwargs)

    # ---- model (see shard_runner.py) -----------------------------------------------------------------------
    def load(self, spec) -> dict:
        """Load this worker's share of the checkpoint; returns what it holds (bytes by kind)."""
        from serving.expert_parallel.shard_runner import ShardRunner

        self.runner = ShardRunner(self, spec)
        return self.runner.held_bytes()

    def execute(self, chunks: list, node_has_work: bool, frees: list[int] = ()):
        """One engine step: free finished sequences' slots, then run the node's chunks (or an idle pass)."""
        self.runner.free(list(frees))
        return self.runner.execute(chunks, node_has_work)

    def free(self, seq_ids: list[int]) -> None:
        self.runner.free(seq_ids)

    def routed_token_counts(self):
        return self.runner.routed_token_counts()

    def exchange_times(self) -> dict:
        return self.runner.exchange_times()

    def kv_cache_usage(self) -> float:
        return self.runner.kv_cache_usage()

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

    def __init__(self, rank: int, world_size: int, tp_size: int, num_threads: int = 1, device: str = "cpu",
                 **model_kwargs):
        import torch

        torch.set_num_threads(num_threads)  # workers share the cores; 1 each unless the CPU budget allows more
        self.rank, self.world_size, self.tp_size = rank, world_size, tp_size
        self.device = self._claim_device(device)
        self.node = rank // tp_size
        self.tp_rank = rank % tp_size
        self.model_kwargs = model_kwargs
        self.tp_group = None
        self.runner = None  # serving.expert_parallel.shard_runner.ShardRunner, after load()

    @staticmethod
    def _claim_device(device: str):
        """The torch device this worker computes on. On GPUs Ray has already narrowed CUDA_VISIBLE_DEVICES to the
        GPU of this worker's bundle, so that GPU is always cuda:0 here."""
        import torch

        if device == "cpu":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError(f"expert-parallel worker asked for device {device!r} but sees no CUDA GPU "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); give each worker "
                               "a GPU (num_gpus_per_worker=1) on nodes with GPUs, or use device='cpu'")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)

    # ---- placement and wiring ------------------------------------------------------------------------------
    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return {"rank": self.rank, "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "device": str(self.device), "gpu_ids": gpus,
                "resources": {k: v for k, v in ctx.get_assigned_resources().items()}}

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((self.where()["ip"], 0))
            return s.getsockname()[1]

    @property
    def backend(self) -> str:
        """NCCL between GPUs (NVLink within a node, the network across nodes), gloo between CPU workers."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    def init_distributed(self, addr: str, port: int, timeout_s: float) -> None:
        """Join the expert group (all workers) and this node's tensor-parallel group."""
        from datetime import timedelta

        import torch.distributed as dist

        if addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep traffic on loopback
        timeout = timedelta(seconds=timeout_s)
        extra = {"device_id": self.device} if self.backend == "nccl" else {}  # NCCL: bind the communicator now
        dist.init_process_group(self.backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=timeout, **extra)
        # Every rank must create every subgroup, in the same order.
        for node in range(self.world_size // self.tp_size):
            ranks = list(range(node * self.tp_size, (node + 1) * self.tp_size))
            g = dist.new_group(ranks, timeout=timeout, backend=self.backend)
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

    def execute(self, chunks: list, node_has_work: bool, want_counts: bool = False):
        """One engine step: run the node's chunks over the blocks the engine chose (or an idle pass).

        Returns (logits or None, routing counts or None): the counts when asked, so the driver keeps a recent copy
        that outlives this worker (a rebuild would otherwise lose every count since the last read).
        """
        logits = self.runner.execute(chunks, node_has_work)
        return logits, (self.runner.routed_token_counts() if want_counts else None)

    def routed_token_counts(self):
        return self.runner.routed_token_counts()

    def exchange_times(self) -> dict:
        return self.runner.exchange_times()


"""Accelerator kinds a cluster file may name, with the memory the planner may use on each.

One registry, looked up by name (`gpu: H100-80GB` in a node group). Memory is what the driver reports as
total (nvidia-smi's MiB figure), not the marketing number: an "80GB" H100 shows 81559 MiB. `cpu` is the
local/test kind: its "GPUs" are worker processes and each gets an equal share of the node's RAM.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class GpuKind:
    """One accelerator model: memory per device and how clouds and Kubernetes name it."""

    name: str
    memory_bytes: int  # 0 for `cpu`: memory comes from the node's RAM instead
    aws_instance: str | None  # the usual 8-GPU AWS instance type, for defaults and messages
    k8s_resource: str | None  # the extended resource a pod requests

    @property
    def is_cpu(self) -> bool:
        return self.memory_bytes == 0


GPU_KINDS: dict[str, GpuKind] = {
    k.name: k
    for k in (
        GpuKind("H100-80GB", 81559 * MIB, "p5.48xlarge", "nvidia.com/gpu"),
        GpuKind("H200-141GB", 143771 * MIB, "p5e.48xlarge", "nvidia.com/gpu"),
        GpuKind("A100-80GB", 81920 * MIB, "p4de.24xlarge", "nvidia.com/gpu"),
        GpuKind("A100-40GB", 40960 * MIB, "p4d.24xlarge", "nvidia.com/gpu"),
        GpuKind("L40S-48GB", 46068 * MIB, "g6e.48xlarge", "nvidia.com/gpu"),
        GpuKind("cpu", 0, None, None),
    )
}


def get_gpu_kind(name: str) -> GpuKind:
    """Look a kind up by name; KeyError's message lists the known kinds."""
    try:
        return GPU_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown GPU kind {name!r}; known kinds: {', '.join(GPU_KINDS)}") from None

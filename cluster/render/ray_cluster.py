"""The Ray cluster launcher config (`ray up FILE`) for AWS: a CPU head, the GPU node groups, herd installed.

Each node group becomes an `available_node_types` entry with its instance type, GPU and CPU resources and a
fixed worker count (min = max = count: the plan assumed that many nodes). Nodes run the herd container image;
the setup commands install the herd package in it, so an image without herd works too.
"""
from __future__ import annotations

from typing import Any

from cluster.render.common import env_vars
from cluster.schema import ClusterSpec
from common.errors import UserError


def ray_cluster_config(spec: ClusterSpec) -> dict[str, Any]:
    """The launcher YAML as a dict, validated against the ray-schema.json that ships with Ray."""
    from cluster.render.validate import validate_ray_cluster

    if spec.provider.cloud != "aws":
        raise UserError(f"provider.cloud: --target ray-cluster renders for aws, this cluster is "
                        f"{spec.provider.cloud!r}; set provider.cloud: aws, or use --target kuberay-service "
                        "(Kubernetes) or --target serve (a running Ray cluster)")
    if not spec.provider.region:
        raise UserError("provider.region: needed for --target ray-cluster; set it, e.g. us-east-1")
    node_types: dict[str, Any] = {
        "head": {
            "node_config": _node_config(spec.head.instance_type, 200),
            "resources": {"CPU": spec.head.cpus, "GPU": 0},  # no model workers on the head
            "min_workers": 0,
            "max_workers": 0,
        }
    }
    for i, g in enumerate(spec.node_groups):
        if not g.instance_type:
            hint = f" (for {g.gpus_per_node} x {g.gpu}: {g.kind.aws_instance})" if g.kind.aws_instance else ""
            raise UserError(f"node_groups[{i}].instance_type: needed for --target ray-cluster{hint}; set it")
        resources = {"CPU": g.cpus}
        if not g.kind.is_cpu:
            resources["GPU"] = g.gpus_per_node
        node_types[g.name] = {
            "node_config": _node_config(g.instance_type, g.disk_gib),
            "resources": resources,
            "min_workers": g.count,
            "max_workers": g.count,
        }
    provider: dict[str, Any] = {"type": "aws", "region": spec.provider.region, "cache_stopped_nodes": False}
    if spec.provider.availability_zone:
        provider["availability_zone"] = spec.provider.availability_zone
    # HERD_LICENSING_KEY passes through from the host's environment by name: its value is never in this file.
    env = " ".join([f"-e {k}={v}" for k, v in env_vars(spec).items()] + ["-e HERD_LICENSING_KEY"])
    config = {
        "cluster_name": spec.name,
        "max_workers": sum(g.count for g in spec.node_groups),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": provider,
        "auth": {"ssh_user": "ubuntu"},
        "docker": {
            "image": spec.runtime.image,
            "container_name": "herd",
            "pull_before_run": True,
            # /dev/shm (NCCL, the object store) is sized by Ray's own detection from each node's memory.
            "run_options": ["--ulimit nofile=65536:65536", env],
        },
        "head_node_type": "head",
        "available_node_types": node_types,
        "setup_commands": [f"pip install --no-cache-dir '{spec.runtime.pip}'"],
        "head_start_ray_commands": [
            "ray stop",
            "ray start --head --port=6379 --object-manager-port=8076 --dashboard-host=0.0.0.0 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }
    validate_ray_cluster(config)
    return config


def _node_config(instance_type: str, disk_gib: int) -> dict[str, Any]:
    return {
        "InstanceType": instance_type,
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": disk_gib, "VolumeType": "gp3"}}],
    }

"""KubeRay manifests: a RayService (the Serve config inside, as serveConfigV2) and a RayJob for fine-tunes.

Both carry the same Ray cluster: a head pod without GPUs and one worker group per node group, each pod asking
for the node group's GPUs, CPUs and memory. The licensing key comes from a Kubernetes Secret
(`<cluster>-secrets`, key `licensing-key`) and the API keys file from the Secret `<cluster>-api-keys`, so no
secret is ever in the manifest.
"""
from __future__ import annotations

import posixpath
from importlib.metadata import version
from typing import Any

from cluster.render.common import dump, env_vars
from cluster.schema import ClusterSpec, NodeGroup


def ray_service(spec: ClusterSpec) -> dict[str, Any]:
    """A RayService serving the model; serveConfigV2 is the same Serve config `--target serve` writes."""
    from cluster.render.serve import serve_config
    from cluster.render.validate import check_kuberay

    serve_text = dump(serve_config(spec), "", "").split("\n", 2)[2]  # the YAML without the header lines
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": spec.name, "namespace": spec.provider.namespace},
        "spec": {"serveConfigV2": serve_text, "rayClusterConfig": _ray_cluster(spec)},
    }
    check_kuberay(manifest)
    return manifest


def ray_job(spec: ClusterSpec, job: str) -> dict[str, Any]:
    """A RayJob that runs `python -m finetune JOB` on its own cluster and tears it down afterwards."""
    import yaml

    from cluster.render.validate import check_kuberay

    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"{spec.name}-finetune", "namespace": spec.provider.namespace},
        "spec": {
            "entrypoint": f"python -m finetune {job}",
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": env_vars(spec)}, sort_keys=False),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": _ray_cluster(spec),
        },
    }
    check_kuberay(manifest)
    return manifest


def _ray_cluster(spec: ClusterSpec) -> dict[str, Any]:
    head = spec.head
    return {
        "rayVersion": version("ray"),
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": {"spec": {"containers": [_container(spec, "ray-head", head.cpus, head.ram_gib, 0, [
                {"containerPort": 6379, "name": "gcs"},
                {"containerPort": 8265, "name": "dashboard"},
                {"containerPort": 10001, "name": "client"},
                {"containerPort": spec.serving.port, "name": "serve"},
            ])], "volumes": _volumes(spec)}},
        },
        "workerGroupSpecs": [_worker_group(spec, g) for g in spec.node_groups],
    }


def _worker_group(spec: ClusterSpec, g: NodeGroup) -> dict[str, Any]:
    gpus = 0 if g.kind.is_cpu else g.gpus_per_node
    pod: dict[str, Any] = {"containers": [_container(spec, "ray-worker", g.cpus, g.ram_gib, gpus, [])],
                           "volumes": _volumes(spec)}
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "groupName": g.name,
        "replicas": g.count,
        "minReplicas": g.count,
        "maxReplicas": g.count,
        "rayStartParams": {},
        "template": {"spec": pod},
    }


def _container(spec: ClusterSpec, name: str, cpus: int, ram_gib: float, gpus: int,
               ports: list[dict[str, Any]]) -> dict[str, Any]:
    res: dict[str, Any] = {"cpu": str(cpus), "memory": f"{int(ram_gib)}Gi"}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    env = [{"name": k, "value": v} for k, v in env_vars(spec).items()]
    env.append({"name": "HERD_LICENSING_KEY",
                "valueFrom": {"secretKeyRef": {"name": f"{spec.name}-secrets", "key": "licensing-key"}}})
    c: dict[str, Any] = {"name": name, "image": spec.runtime.image, "env": env,
                         "resources": {"limits": dict(res), "requests": dict(res)},
                         "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    if spec.serving.api_keys_file:
        c["volumeMounts"].append({"name": "api-keys", "mountPath": posixpath.dirname(spec.serving.api_keys_file),
                                  "readOnly": True})
    if ports:
        c["ports"] = ports
    return c


def _volumes(spec: ClusterSpec) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if spec.serving.api_keys_file:
        vols.append({"name": "api-keys", "secret": {"secretName": f"{spec.name}-api-keys", "items": [
            {"key": "api-keys", "path": posixpath.basename(spec.serving.api_keys_file)}]}})
    return vols

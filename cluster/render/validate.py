"""Checks every rendered file passes before it is written: Ray's own schemas, and KubeRay's structure.

Ray ships a JSON schema for cluster launcher files (`ray/autoscaler/ray-schema.json`, also checked after
filling in defaults as `ray up` does) and pydantic models for Serve configs (`ray.serve.schema.ServeDeploySchema`);
both are used as is. No KubeRay schema ships with
Ray, so `check_kuberay` asserts the structure KubeRay's CRDs require (apiVersion ray.io/v1, head and worker
group specs with container resources, GPU requests on GPU groups, a Serve config inside a RayService).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RenderValidationError(AssertionError):
    """A rendered file that its target's schema rejects (a bug in herd, not in the user's file)."""


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_ray_cluster(config: dict[str, Any]) -> None:
    """ray-schema.json, then what `ray up` itself runs: fill in the provider's defaults and validate again."""
    import copy

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        jsonschema.validate(config, ray_schema())
    except jsonschema.ValidationError as e:
        raise RenderValidationError(f"ray-schema.json rejects the cluster config at "
                                    f"{'/'.join(map(str, e.absolute_path))}: {e.message}") from None
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, RuntimeError, jsonschema.ValidationError) as e:
        raise RenderValidationError(f"ray up would reject the cluster config: {e}") from None


def validate_serve_config(config: dict[str, Any]) -> None:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        raise RenderValidationError(f"ServeDeploySchema rejects the Serve config: {e}") from None


def check_kuberay(manifest: dict[str, Any]) -> None:
    """Structure KubeRay needs in a RayService or RayJob; serveConfigV2 checked with ServeDeploySchema."""
    import yaml

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise RenderValidationError(f"KubeRay {manifest.get('kind')}: {what}")

    need(manifest.get("apiVersion") == "ray.io/v1", "apiVersion must be ray.io/v1")
    kind = manifest.get("kind")
    need(kind in ("RayService", "RayJob"), f"kind must be RayService or RayJob, got {kind!r}")
    need(bool(manifest.get("metadata", {}).get("name")), "metadata.name is required")
    spec = manifest.get("spec", {})
    cluster = spec.get("rayClusterConfig" if kind == "RayService" else "rayClusterSpec")
    need(isinstance(cluster, dict), "the Ray cluster spec is missing")
    head = cluster.get("headGroupSpec", {})
    need("rayStartParams" in head, "headGroupSpec.rayStartParams is required")
    _check_pod(head.get("template", {}), "headGroupSpec", need, gpu=False)
    groups = cluster.get("workerGroupSpecs") or []
    need(len(groups) >= 1, "at least one workerGroupSpec is required")
    for i, g in enumerate(groups):
        need(bool(g.get("groupName")), f"workerGroupSpecs[{i}].groupName is required")
        need(isinstance(g.get("replicas"), int) and g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", 10**9),
             f"workerGroupSpecs[{i}]: minReplicas <= replicas <= maxReplicas")
        need("rayStartParams" in g, f"workerGroupSpecs[{i}].rayStartParams is required")
        _check_pod(g.get("template", {}), f"workerGroupSpecs[{i}]", need, gpu=None)
    if kind == "RayService":
        need(isinstance(spec.get("serveConfigV2"), str), "spec.serveConfigV2 must be a YAML string")
        validate_serve_config(yaml.safe_load(spec["serveConfigV2"]))
    else:
        need(isinstance(spec.get("entrypoint"), str) and spec["entrypoint"], "spec.entrypoint is required")


def _check_pod(template: dict[str, Any], where: str, need, gpu: bool | None) -> None:
    containers = template.get("spec", {}).get("containers") or []
    need(len(containers) >= 1, f"{where}.template.spec.containers is empty")
    c = containers[0]
    need(bool(c.get("image")), f"{where}: container image is required")
    res = c.get("resources", {})
    for part in ("limits", "requests"):
        need("cpu" in res.get(part, {}) and "memory" in res.get(part, {}), f"{where}: {part}.cpu and memory needed")
    gpus = res.get("limits", {}).get("nvidia.com/gpu")
    if gpu is False:
        need(gpus is None, f"{where}: the head must not request GPUs")
    if gpus is not None:
        need(res.get("requests", {}).get("nvidia.com/gpu") == gpus, f"{where}: GPU requests must equal limits")

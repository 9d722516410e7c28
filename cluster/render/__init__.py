"""Deployable configs rendered from one cluster file, each validated before it is written.

Targets: `ray-cluster` (Ray cluster launcher YAML for AWS), `kuberay-service` (KubeRay RayService with the
Serve config inside), `kuberay-job` (KubeRay RayJob running a fine-tune), `serve` (a Serve config file for
`serve deploy`). `render(spec, target, source=...)` returns the YAML text; the header names the source file
and the command that regenerates it.
"""
from __future__ import annotations

from cluster.schema import ClusterSpec

TARGETS = ("ray-cluster", "kuberay-service", "kuberay-job", "serve")


def render(spec: ClusterSpec, target: str, source: str, job: str | None = None) -> str:
    """Render and validate one target; raises `UserError` when the cluster cannot have this target."""
    from cluster.render import kuberay, ray_cluster, serve
    from cluster.render.common import dump
    from common.errors import UserError

    if target == "ray-cluster":
        doc = ray_cluster.ray_cluster_config(spec)
    elif target == "serve":
        doc = serve.serve_config(spec)
    elif target == "kuberay-service":
        doc = kuberay.ray_service(spec)
    elif target == "kuberay-job":
        if not job:
            raise UserError("herd render --target kuberay-job: give the fine-tune job file with --job JOB.yaml "
                            "(a path inside the container, or relative to the job's working directory)")
        doc = kuberay.ray_job(spec, job)
    else:
        raise UserError(f"--target: unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    command = f"herd render {source} --target {target}" + (f" --job {job}" if job else "") + " -o FILE"
    return dump(doc, source, command)

"""The Ray Serve config (`serve deploy FILE`): herd's app with the arguments `serving.app:build_app` takes.

`serve_args(spec)` is the one place the cluster file turns into engine arguments, so `herd serve
CLUSTER.yaml` and the rendered file start the same thing. Weight dtypes the engine cannot load yet are
refused here, by name, with what is missing.
"""
from __future__ import annotations

from typing import Any

from cluster.render.common import env_vars
from cluster.schema import ClusterSpec
from common.errors import UserError

IMPORT_PATH = "serving.app:build_app"
SERVABLE_DTYPES = ("bf16", "fp32")
_MISSING = {
    "fp8": "an fp8 expert matmul with per-row scales and a loader for the FP8 checkpoint's scale tensors",
    "int4": "int4 group-quantised linear kernels and a loader for the quantised checkpoint",
}


def require_servable(spec: ClusterSpec) -> None:
    """Refuse what the engine cannot serve yet and what does not fit, with the fix in the message."""
    dtype = spec.model.weight_dtype
    kv, kv_served = spec.model.kv_cache_dtype, "fp32" if dtype == "fp32" else "bf16"
    if kv == "fp8":  # else the plan counts a cache the engine does not build (fp8 holds twice the tokens)
        raise UserError(f"model.kv_cache_dtype {kv}: the engine keeps the KV cache in the weights' dtype "
                        f"({kv_served}) and has no {kv} cache yet; set model.kv_cache_dtype: {kv_served} (herd plan "
                        "then counts the cache the engine builds)")
    if dtype not in SERVABLE_DTYPES:
        raise UserError(
            f"model.weight_dtype {dtype}: herd plans {dtype} but cannot serve it yet; the engine loads bf16/fp32 "
            f"weights only and lacks {_MISSING[dtype]}. Serve a bf16 checkpoint (set model.weight_dtype: bf16; "
            "herd plan shows the nodes it needs)")
    if spec.model.checkpoint is None:
        raise UserError(f"model.checkpoint: needed to serve (the preset {spec.model.preset!r} is only a shape); set it "
                        "to a checkpoint folder or s3:// URI in the Hugging Face layout")
    from cluster.planner import plan

    p = plan(spec)
    if not p.fits:
        raise UserError(f"the plan does not fit ({p.reasons[0]}); fix: {p.fixes[0] if p.fixes else 'see herd plan'}",
                        exit_code=1)


def serve_args(spec: ClusterSpec, absolute_paths: bool = True) -> dict[str, Any]:
    """The `args` of herd's Serve application: what `build_app(args)` receives (serving/api/config.py).

    Relative local paths (checkpoint, keys file, placement file) are made absolute from the current directory,
    since Serve replicas run elsewhere; rendered files keep them as written (`absolute_paths=False`).
    """
    s, group = spec.serving, spec.serving_group
    fix = _absolute if absolute_paths else (lambda p: p)
    args: dict[str, Any] = {
        "model": fix(spec.model.checkpoint),
        "expert_parallel_size": spec.expert_parallel_size,
        "tensor_parallel_size": group.gpus_per_node,
        "max_model_len": s.max_context_len,
        "max_num_seqs": s.max_concurrent_sequences,
        "served_model_name": spec.served_model_name,
    }
    if spec.model.weight_dtype in ("bf16", "fp32"):
        args["dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[spec.model.weight_dtype]
    if group.kind.is_cpu:
        args["device"] = "cpu"
    else:
        args["device"] = "cuda"
        # one GPU per expert-parallel worker; a one-GPU replica runs the model inside the replica itself
        args.update({"worker_num_gpus": 1, "worker_num_cpus": 1} if spec.expert_parallel_size > 1
                    else {"replica_num_gpus": 1, "replica_num_cpus": 1})
        # The planner's per-GPU KV budget, split as it planned: the engine allocates the pools herd plan counted.
        # (CPU workers share RAM with everything else: there the engine keeps its default, max_num_seqs sequences
        # of max_model_len tokens.)
        budget = _kv_budget(spec)
        if budget > 0:  # else the plan does not fit, and require_servable says why
            args["kv_cache_memory_bytes"] = budget
            args["mean_sequence_tokens"] = s.mean_sequence_tokens
    args["product"] = spec.licensing.product
    # A cloud deployment must count its users for the licence: refuse to start rather than serve uncounted.
    args["require_licensing"] = (s.require_licensing if s.require_licensing is not None
                                 else spec.provider.cloud != "local")
    if s.api_keys_file:
        args["api_keys_file"] = fix(s.api_keys_file)
    if s.placement_file:
        args["placement_file"] = fix(s.placement_file)
    if s.replicas > 1:
        args["num_replicas"] = s.replicas
    img, default = s.images, type(s.images)()
    for key, arg in (("max_per_request", "max_images_per_request"), ("max_bytes", "max_image_bytes"),
                     ("max_pixels", "max_image_pixels"), ("url_allowed_hosts", "image_url_allowed_hosts")):
        if getattr(img, key) != getattr(default, key):  # defaults stay out: the Serve args have the same ones
            args[arg] = getattr(img, key)
    return args


def serve_config(spec: ClusterSpec) -> dict[str, Any]:
    """A whole Serve config, validated with Ray's own `ServeDeploySchema`."""
    require_servable(spec)
    from cluster.render.validate import validate_serve_config

    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1" if spec.provider.cloud == "local" else "0.0.0.0",
                         "port": spec.serving.port},
        "applications": [{
            "name": "herd",
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "runtime_env": {"env_vars": env_vars(spec)},
            "args": serve_args(spec, absolute_paths=False),
        }],
    }
    validate_serve_config(config)
    return config


def _kv_budget(spec: ClusterSpec) -> int:
    """The plan's KV-cache bytes per GPU, in whole bytes (0 when nothing is left for it)."""
    from cluster.planner import plan

    return max(0, int(plan(spec).per_gpu.kv_budget))


def _absolute(path: str) -> str:
    from pathlib import Path

    return path if "://" in path else str(Path(path).resolve())

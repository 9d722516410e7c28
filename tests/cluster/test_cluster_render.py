"""Rendered configs pass Ray's own schemas and KubeRay's structure; what cannot be served is refused."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.render import render
from cluster.render.validate import RenderValidationError, check_kuberay, validate_ray_cluster
from cluster.schema import parse_cluster
from herd.errors import UserError


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _serve_schema():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


def _render(cluster_doc, target, job=None, **kw):
    text = render(parse_cluster(cluster_doc(**kw)), target, source="c.yaml", job=job)
    assert text.startswith("# Rendered by herd from c.yaml; do not edit by hand.\n")
    return yaml.safe_load(text)


BF16_2X8 = dict(preset="maverick", dtype="bf16", count=2, nodes_per_replica=2, max_context_len=65536,
                api_keys_file="/etc/herd/keys/keys.yaml")


def test_ray_cluster_config_passes_rays_json_schema(cluster_doc):
    doc = _render(cluster_doc, "ray-cluster", **BF16_2X8)
    jsonschema.validate(doc, _ray_schema())
    assert doc["provider"] == {"type": "aws", "region": "us-east-1", "cache_stopped_nodes": False}
    gpu = doc["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu["resources"] == {"CPU": 180, "GPU": 8}
    assert gpu["min_workers"] == gpu["max_workers"] == 2
    assert doc["available_node_types"]["head"]["resources"]["GPU"] == 0
    assert doc["setup_commands"] == ["pip install --no-cache-dir 'llama-herd==0.1.0'"]
    assert doc["docker"]["image"] == "ghcr.io/your-org/herd:0.1.0"


def test_the_validator_rejects_what_ray_rejects(cluster_doc):
    doc = _render(cluster_doc, "ray-cluster", **BF16_2X8)
    doc["available_node_types"]["gpu"]["resources"]["GPU"] = "8"  # Ray wants integers
    with pytest.raises(RenderValidationError, match="available_node_types/gpu/resources/GPU"):
        validate_ray_cluster(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _ray_schema())
    doc = _render(cluster_doc, "ray-cluster", **BF16_2X8)
    doc["head_node_type"] = "gpu-head"  # schema-valid, but `ray up` refuses it
    with pytest.raises(RenderValidationError, match="ray up would reject .*head_node_type"):
        validate_ray_cluster(doc)


def test_serve_config_passes_serve_deploy_schema_with_build_app_args(cluster_doc, tmp_path):
    from cluster.placement import PlacementMap

    placement = str(tmp_path / "placement.json")
    PlacementMap.contiguous(list(range(1, 48, 2)), 128, 8, nodes=2, redundant=0).save(placement)
    doc = _render(cluster_doc, "serve", placement_file=placement, **BF16_2X8)
    _serve_schema().model_validate(doc)
    app = doc["applications"][0]
    assert app["import_path"] == "serving.app:build_app"
    assert app["args"] == {
        "model": "s3://bucket/maverick", "expert_parallel_size": 16, "tensor_parallel_size": 8,
        "max_model_len": 65536, "max_num_seqs": 32, "served_model_name": "llama4-maverick",
        "dtype": "bfloat16", "device": "cuda", "worker_num_gpus": 1, "worker_num_cpus": 1, "product": "llm-api",
        "api_keys_file": "/etc/herd/keys/keys.yaml", "placement_file": placement,
        "kv_cache_memory_bytes": app["args"]["kv_cache_memory_bytes"], "mean_sequence_tokens": 2048,
        "require_licensing": True}
    env = app["runtime_env"]["env_vars"]
    assert env == {"HERD_LICENSING_STORE": "./herd-data/licensing"}  # the key itself is never rendered


def test_kuberay_service_structure(cluster_doc):
    m = _render(cluster_doc, "kuberay-service", **BF16_2X8)
    check_kuberay(m)
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayService")
    serve = yaml.safe_load(m["spec"]["serveConfigV2"])
    _serve_schema().model_validate(serve)
    assert serve["applications"][0]["args"]["expert_parallel_size"] == 16
    cluster = m["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    [group] = cluster["workerGroupSpecs"]
    assert group["groupName"] == "gpu" and group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"] == {"cpu": "180", "memory": "1800Gi", "nvidia.com/gpu": "8"}
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    secret = next(e for e in worker["env"] if e["name"] == "HERD_LICENSING_KEY")
    assert secret == {"name": "HERD_LICENSING_KEY",
                      "valueFrom": {"secretKeyRef": {"name": "test-secrets", "key": "licensing-key"}}}
    assert {"name": "api-keys", "mountPath": "/etc/herd/keys", "readOnly": True} in worker["volumeMounts"]


def test_kuberay_job_runs_the_finetune_entrypoint(cluster_doc):
    m = _render(cluster_doc, "kuberay-job", job="jobs/lora.yaml", **BF16_2X8)
    check_kuberay(m)
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayJob")
    assert m["spec"]["entrypoint"] == "python -m finetune jobs/lora.yaml"
    assert m["spec"]["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(m["spec"]["runtimeEnvYAML"])["env_vars"]["HERD_LICENSING_STORE"] == "./herd-data/licensing"
    assert m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] == "8"
    with pytest.raises(UserError, match="give the fine-tune job file with --job"):
        _render(cluster_doc, "kuberay-job", **BF16_2X8)


def test_check_kuberay_catches_broken_manifests(cluster_doc):
    m = _render(cluster_doc, "kuberay-service", **BF16_2X8)
    m["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(RenderValidationError, match="apiVersion must be ray.io/v1"):
        check_kuberay(m)
    m = _render(cluster_doc, "kuberay-service", **BF16_2X8)
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "requests"].pop("nvidia.com/gpu")
    with pytest.raises(RenderValidationError, match="GPU requests must equal limits"):
        check_kuberay(m)
    m = _render(cluster_doc, "kuberay-service", **BF16_2X8)
    m["spec"]["serveConfigV2"] = "applications:\n- import_path: nodots\n"
    with pytest.raises(RenderValidationError, match="ServeDeploySchema rejects"):
        check_kuberay(m)


@pytest.mark.parametrize("dtype,missing", [("fp8", "an fp8 expert matmul"), ("int4", "int4 group-quantised")])
@pytest.mark.parametrize("target", ["serve", "kuberay-service"])
def test_serving_refuses_fp8_and_int4_naming_what_is_missing(cluster_doc, dtype, missing, target):
    with pytest.raises(UserError) as e:
        _render(cluster_doc, target, preset="maverick", dtype=dtype)
    assert str(e.value).startswith(f"model.weight_dtype {dtype}: herd plans {dtype} but cannot serve it yet; the "
                                   f"engine loads bf16/fp32 weights only and lacks {missing}")
    _render(cluster_doc, "ray-cluster", preset="maverick", dtype=dtype)  # the cluster itself is fine


def test_serve_refuses_a_plan_that_does_not_fit(cluster_doc):
    with pytest.raises(UserError) as e:
        _render(cluster_doc, "serve", preset="maverick", dtype="bf16")
    assert e.value.exit_code == 1
    assert str(e.value).startswith("the plan does not fit (weights need 100.4 GB per GPU")


def test_ray_cluster_needs_aws_and_instance_types(cluster_doc):
    doc = cluster_doc()
    doc["provider"] = {"cloud": "kubernetes"}
    with pytest.raises(UserError, match="provider.cloud: --target ray-cluster renders for aws"):
        render(parse_cluster(doc), "ray-cluster", source="c.yaml")
    doc = cluster_doc()
    del doc["node_groups"][0]["instance_type"]
    with pytest.raises(UserError) as e:
        render(parse_cluster(doc), "ray-cluster", source="c.yaml")
    assert str(e.value) == ("node_groups[0].instance_type: needed for --target ray-cluster (for 8 x H100-80GB: "
                            "p5.48xlarge); set it")


def test_a_placement_file_for_another_layout_is_refused(cluster_doc, tmp_path):
    from cluster.placement import PlacementMap
    from cluster.schema import ClusterFileError

    placement = str(tmp_path / "placement.json")
    PlacementMap.contiguous(list(range(1, 48, 2)), 128, 8, nodes=1).save(placement)
    with pytest.raises(ClusterFileError) as e:
        _render(cluster_doc, "serve", placement_file=placement, **BF16_2X8)
    assert str(e.value).startswith(f"serving.placement_file: {placement!r} is for 128 experts on workers [8] and MoE "
                                   "layers [1, 3, 5, 7]..., but this layout has 128 experts on workers [8, 8]")


def test_serve_needs_a_checkpoint_not_just_a_preset(cluster_doc):
    doc = cluster_doc(count=2, nodes_per_replica=2)
    del doc["model"]["checkpoint"]
    with pytest.raises(UserError) as e:
        render(parse_cluster(doc), "serve", source="c.yaml")
    assert str(e.value).startswith("model.checkpoint: needed to serve (the preset 'maverick' is only a shape)")


def test_serve_args_are_what_the_serving_app_accepts(cluster_doc):
    """The contract with serving/: build_app's own closed argument schema accepts every rendered args dict."""
    from cluster.render.serve import serve_args
    from serving.api.config import parse_args

    for kw in (BF16_2X8, dict(preset="scout", dtype="bf16", gpus=8), dict(preset="scout", dtype="bf16", gpus=2,
                                                                           count=2, replicas=2)):
        spec = parse_cluster(cluster_doc(**kw))
        a = parse_args(serve_args(spec))
        assert a.expert_parallel_size == spec.expert_parallel_size and a.num_replicas == spec.serving.replicas
    a = parse_args(serve_args(parse_cluster(cluster_doc(preset="scout", dtype="bf16", gpus=1))))
    assert (a.replica_num_gpus, a.expert_parallel_size, a.device) == (1, 1, "cuda")


def test_serve_args_resolve_relative_paths_for_herd_serve(cluster_doc, tmp_path, monkeypatch):
    from cluster.render.serve import serve_args

    monkeypatch.chdir(tmp_path)
    doc = cluster_doc(count=2, nodes_per_replica=2, api_keys_file="keys.yaml")
    doc["model"]["checkpoint"] = "ckpt/maverick"
    spec = parse_cluster(doc)
    args = serve_args(spec)
    assert args["model"] == str(tmp_path / "ckpt/maverick") and args["api_keys_file"] == str(tmp_path / "keys.yaml")
    assert serve_args(spec, absolute_paths=False)["model"] == "ckpt/maverick"
    assert serve_args(parse_cluster(cluster_doc(count=2, nodes_per_replica=2)))["model"] == "s3://bucket/maverick"


def test_serve_args_carry_the_planned_kv_budget_and_the_engine_sizes_the_planned_pools(cluster_doc):
    """The rendered per-GPU KV budget and mean length give each worker the pools herd plan counted per node, and
    the Serve args accept the rendered max_model_len against that budget."""
    import torch

    from cluster.planner import plan
    from cluster.render.serve import serve_args
    from cluster.schema import parse_cluster
    from serving.api.config import parse_args
    from serving.engine.kv_cache import plan_kv_cache

    spec = parse_cluster(cluster_doc(**BF16_2X8, mean_sequence_tokens=4096))
    p, args = plan(spec), serve_args(spec)
    assert args["kv_cache_memory_bytes"] == int(p.per_gpu.kv_budget) and args["mean_sequence_tokens"] == 4096
    engine = plan_kv_cache(spec.text_config, args["max_model_len"], torch.bfloat16, args["max_num_seqs"],
                           memory_bytes=args["kv_cache_memory_bytes"], tensor_parallel_size=8,
                           mean_sequence_tokens=4096)
    assert (engine.global_blocks, engine.chunked_blocks) == (p.kv.global_blocks_per_node, p.kv.chunked_blocks_per_node)
    a, note = parse_args(args).fit_max_model_len(spec.text_config)
    assert a.max_model_len == 65536 and note is None
    # CPU workers keep the engine's default cache (RAM is shared with everything else).
    cpu = serve_args(parse_cluster(cluster_doc(preset="maverick-tiny", gpu="cpu", gpus=2)))
    assert "kv_cache_memory_bytes" not in cpu


def test_cloud_serve_configs_require_licensing_and_refuse_an_fp8_cache(cluster_doc):
    """Issue 16 item 13: a rendered cloud app refuses to start without the licensing key (a cluster file may turn
    it off); a local one does not. An fp8 KV cache is refused: the engine would build a bf16 one the plan did
    not count."""
    args = _render(cluster_doc, "serve", **BF16_2X8)["applications"][0]["args"]
    assert args["require_licensing"] is True
    args = _render(cluster_doc, "serve", require_licensing=False, **BF16_2X8)["applications"][0]["args"]
    assert args["require_licensing"] is False
    with pytest.raises(UserError, match=r"^model.kv_cache_dtype fp8: the engine keeps the KV cache in the weights'"):
        doc = cluster_doc(**BF16_2X8)
        doc["model"]["kv_cache_dtype"] = "fp8"
        render(parse_cluster(doc), "serve", source="c.yaml")

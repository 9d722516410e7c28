"""The planner counts the vision tower and the worst-case image tokens; the cluster file's image limits reach the
Serve args."""
from __future__ import annotations

import pytest

from cluster.planner import plan
from cluster.schema import parse_cluster
from llama4.checkpoint import vision_tensor_shapes
from llama4.presets import PRESETS


def test_vision_params_equal_transformers_module_count():
    import math

    from llama4.sizing import vision_params

    p = PRESETS["maverick"]
    config = {"text_config": {**p.text, "vocab_size": 202048}, "vision_config": p.vision}
    assert vision_params(p.vision, p.text["hidden_size"]) == sum(
        math.prod(s) for s in vision_tensor_shapes(config).values()) == 871_932_416


def test_plan_counts_vision_weights_and_image_tokens(cluster_doc):
    p = plan(parse_cluster(cluster_doc(preset="maverick", dtype="fp8")))
    m = p.model
    assert m["params_vision"] == 871_932_416 and m["weight_bytes_vision"] == 2 * 871_932_416
    assert p.per_gpu.vision == pytest.approx(2 * 871_932_416 / 8)  # split over the node's 8 GPUs
    assert p.per_gpu.weights == pytest.approx(p.per_gpu.non_expert + p.per_gpu.routed_experts + p.per_gpu.vision)
    # 336-px tiles, 144 tokens each: 16 grid tiles + the global one, 16 separators, 3 markers; 8 images
    assert m["image_tokens_per_image_max"] == 17 * 144 + 16 + 3 == 2467
    assert m["image_tokens_per_request_max"] == 8 * 2467


def test_plan_warns_when_the_image_limit_exceeds_the_context(cluster_doc):
    warn = "full-size images takes 19736 prompt tokens, more than max_context_len (16384)"
    p = plan(parse_cluster(cluster_doc(preset="maverick", dtype="fp8", max_context_len=16384)))
    assert any(warn in w for w in p.warnings)
    fine = plan(parse_cluster(cluster_doc(preset="maverick", dtype="fp8", max_context_len=16384,
                                          images={"max_per_request": 4})))
    assert not any("full-size images" in w for w in fine.warnings)
    assert fine.model["image_tokens_per_request_max"] == 4 * 2467


def test_image_limits_reach_the_serve_args(cluster_doc):
    from cluster.render.serve import serve_args
    from serving.api.config import parse_args

    doc = cluster_doc(preset="maverick", dtype="bf16")
    doc["model"]["checkpoint"] = "/models/maverick"
    assert not any("image" in k for k in serve_args(parse_cluster(doc)))  # defaults: the Serve args' own
    doc["serving"]["images"] = {"max_per_request": 2, "max_pixels": 4_000_000, "url_allowed_hosts": ["cdn.example"]}
    args = serve_args(parse_cluster(doc))
    assert (args["max_images_per_request"], args["max_image_pixels"], args["image_url_allowed_hosts"]) == (
        2, 4_000_000, ["cdn.example"])
    limits = parse_args(args).image_limits()
    assert limits.max_images_per_request == 2 and limits.allowed_hosts == ("cdn.example",)


def test_unknown_image_key_is_refused_with_a_suggestion(cluster_doc):
    from common.errors import ClusterFileError

    doc = cluster_doc()
    doc["serving"]["images"] = {"max_per_requests": 2}
    with pytest.raises(ClusterFileError, match="max_per_request"):
        parse_cluster(doc)

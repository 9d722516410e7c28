"""Fixtures for the expert-parallel tests: the single-process reference and the EP engines on maverick-tiny.

Package-scoped: built once for tests/serving_ep and shut down (actors, placement groups) when it is done,
while the session's two-node Ray cluster stays up for the other areas.
"""
from __future__ import annotations

import os

import pytest

PROMPTS = ["The quick brown fox", "Llama herds cross the", "Expert parallel test: one two three four five six",
           "a"]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)


@pytest.fixture(scope="package")
def reference_engine(maverick_tiny):
    """The single-process engine (fp32) every expert-parallel layout must match."""
    from herd_testing import fp32_engine

    with fp32_engine(maverick_tiny, max_num_seqs=8, max_model_len=256) as engine:
        yield engine


@pytest.fixture(scope="package")
def reference_tokens(reference_engine):
    from serving.engine import SamplingParams

    outs = reference_engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="package")
def s3_checkpoint(s3_server, maverick_tiny, tmp_path_factory):
    """maverick-tiny uploaded to the loopback S3 server; (url, endpoint, local metadata folder)."""
    import uuid

    import boto3

    from serving.expert_parallel.s3 import S3Checkpoint, upload_checkpoint

    bucket = f"ep-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/maverick-tiny"
    upload_checkpoint(maverick_tiny, url, endpoint_url=s3_server)
    tmp = tmp_path_factory.mktemp("s3meta")
    meta = S3Checkpoint(url, cache_dir=tmp / "driver", endpoint_url=s3_server).download_metadata(tmp / "meta")
    return url, s3_server, meta


@pytest.fixture(scope="package")
def ep2_engine(ray_cluster, s3_checkpoint, tmp_path_factory):
    """EP=2: two simulated nodes with one worker each, weights from S3 (no shared folder, node-local caches)."""
    from serving.engine import LLMEngine

    url, endpoint, meta = s3_checkpoint
    engine = LLMEngine.from_pretrained(meta, dtype="float32", max_num_seqs=8, max_model_len=256,
                                       expert_parallel_size=2, nodes=["node0", "node1"], num_cpus_per_worker=0.25,
                                       weights=url, s3_endpoint_url=endpoint,
                                       cache_dir=str(tmp_path_factory.mktemp("s3cache")),
                                       worker_env={k: v for k, v in os.environ.items() if k.startswith("AWS_")},
                                       counts_sync_interval_s=0)  # every step: the failure test counts exactly
    yield engine
    engine.shutdown()


@pytest.fixture(scope="package")
def ep4_engine(ray_cluster, maverick_tiny, tmp_path_factory):
    """EP=4: two simulated nodes with two workers each (tensor parallel within the node), from the folder, with
    a planner's placement file that gives experts 0 and 1 a second copy on the other node."""
    import torch

    from cluster.placement import PlacementMap
    from llama4.config import TextConfig
    from serving.engine import LLMEngine
    from llama4.sizing import kv_bytes_per_token

    cfg = TextConfig.from_pretrained(maverick_tiny)
    path = tmp_path_factory.mktemp("placement") / "placement.json"
    PlacementMap.contiguous(list(cfg.moe_layers), cfg.num_local_experts, 2, nodes=2, redundant=2).save(path)
    # A per-worker KV budget of 1.5 full sequences: with tp=2 a worker holds half of each, so 3 per node.
    per_seq = kv_bytes_per_token(cfg, "fp32").sequence_bytes(256)
    engine = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=8, max_model_len=256,
                                       expert_parallel_size=4, tensor_parallel_size=2, nodes=["node0", "node1"],
                                       num_cpus_per_worker=0.25, placement=str(path),
                                       kv_cache_memory_bytes=1.5 * per_seq)
    yield engine
    engine.shutdown()

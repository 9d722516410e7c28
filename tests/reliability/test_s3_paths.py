"""A bucket writer cannot write anywhere on a serving node (issue 16, item 8).

Shard names in a checkpoint's index.json must be plain file names inside the cache folder; the node-local cache is
keyed by the source and each object's ETag (a shard replaced in the bucket is fetched again, not served stale);
cached ranges are checked for size; caches live under one herd cache root that is private to the user.
Real S3 protocol: moto's server on loopback, through boto3.
"""
from __future__ import annotations

import json
import os

import pytest
import torch


def _upload_checkpoint(s3, bucket: str, prefix: str, weight_map: dict, tensors: dict) -> None:
    import io

    from safetensors.torch import save

    s3.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors.index.json",
                  Body=json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    for shard in set(weight_map.values()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{shard}", Body=save(tensors))


@pytest.mark.parametrize("shard", ["../../escaped.safetensors", "/tmp/herd-escaped.safetensors",
                                   "sub/../../escaped.safetensors", "..", ".hidden.safetensors"])
def test_a_shard_name_that_leaves_the_folder_is_refused(s3_bucket, tmp_path, shard):
    import boto3

    from llama4.checkpoint import CheckpointError
    from serving.expert_parallel.s3 import S3Checkpoint

    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint)
    _upload_checkpoint(s3, bucket, "ckpt", {"w": shard}, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="weight_map"):
        ck = S3Checkpoint(f"s3://{bucket}/ckpt", tmp_path / "cache", endpoint_url=endpoint)
        ck.download_all(tmp_path / "cache" / "meta")
    assert not (tmp_path / "escaped.safetensors").exists() and not os.path.exists("/tmp/herd-escaped.safetensors")


def test_a_replaced_shard_is_fetched_again_and_a_short_cache_file_refetched(s3_bucket, tmp_path):
    import boto3

    from serving.expert_parallel.s3 import S3Checkpoint

    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint)
    url, cache = f"s3://{bucket}/ckpt", tmp_path / "cache"
    _upload_checkpoint(s3, bucket, "ckpt", {"w": "model-00001-of-00001.safetensors"}, {"w": torch.ones(4)})
    assert S3Checkpoint(url, cache, endpoint_url=endpoint).get("w").tolist() == [1.0] * 4
    _upload_checkpoint(s3, bucket, "ckpt", {"w": "model-00001-of-00001.safetensors"}, {"w": torch.full((4,), 7.0)})
    fresh = S3Checkpoint(url, cache, endpoint_url=endpoint)
    assert fresh.get("w").tolist() == [7.0] * 4  # new ETag: not the stale cached bytes
    for f in cache.rglob("*"):  # damage every cached range: each is fetched again, not trusted
        if f.is_file() and "-" in f.name and not f.name.endswith(".lock"):
            f.write_bytes(f.read_bytes()[:-1])
    again = S3Checkpoint(url, cache, endpoint_url=endpoint)
    assert again.get("w").tolist() == [7.0] * 4 and again.bytes_fetched > 0


def test_the_cache_root_is_one_private_folder(tmp_path, monkeypatch):
    from serving.expert_parallel.s3 import CacheRootError, cache_root

    monkeypatch.setenv("HERD_CACHE_DIR", str(tmp_path / "herd-cache"))
    root = cache_root()
    assert root == tmp_path / "herd-cache" and root.is_dir() and (root.stat().st_mode & 0o077) == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("HERD_CACHE_DIR", str(shared))
    with pytest.raises(CacheRootError, match="writable by other users"):
        cache_root()
    monkeypatch.delenv("HERD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "herd"

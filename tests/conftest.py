"""Shared test scaffolding: one two-node Ray cluster on loopback, a loopback S3 server, tiny checkpoints.

Everything here is real (Ray, moto's standalone S3 server reached through boto3); only the sizes are small.
"""
from __future__ import annotations

import os

# Before anything imports ray: keep every Ray listener on loopback (see shared/NOTES-stack.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DeepSpeed's CPU ops compile once per machine into this ignored folder, then are reused.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_REPO, ".cache", "torch_extensions"))
# herd's own node-local caches (S3 byte ranges, fetched fine-tune inputs) go here too, never to ~/.cache/herd.
os.environ.setdefault("HERD_CACHE_DIR", os.path.join(_REPO, ".cache", "herd"))
# Libraries that would otherwise write under ~ (matplotlib's font cache for loss plots, Hugging Face's cache).
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_REPO, ".cache", "matplotlib"))
os.environ.setdefault("HF_HOME", os.path.join(_REPO, ".cache", "huggingface"))
# Ray (2.60+) turns token auth on for a new local cluster (`herd serve`, `make demo` in a subprocess) and, finding
# no token, writes one to ~/.ray/auth_token. A token of the session's own, in the environment that every Ray
# process here inherits, means none is read from or written to the user's home.
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    import secrets

    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

torch.set_num_threads(1)


from herd_testing import free_port, wait_port as _wait_port  # noqa: E402,F401  (re-exported)


@pytest.fixture(scope="session", autouse=True)
def home_untouched():
    """The suite never writes Ray's token or herd's caches under the user's home (checked when the session ends:
    a test that starts Ray or a cache without the environment above shows up here)."""
    home = Path.home()
    watched = [home / ".ray" / "auth_token", home / ".cache" / "herd"]
    before = {p: p.stat().st_mtime if p.exists() else None for p in watched}
    yield
    changed = [str(p) for p in watched if (p.stat().st_mtime if p.exists() else None) != before[p]]
    assert not changed, f"the test session wrote under the user's home: {changed}"


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on 127.0.0.1, shared by every test of the session.

    Each simulated node declares 4 CPUs (fractional requests let several workers share this 2-core machine)
    and a custom resource `node0` / `node1`, so tests can place work on a given node.
    Yields the `ray.cluster_utils.Cluster`; `ray` is initialised against it.
    """
    import ray
    from ray.cluster_utils import Cluster

    # Ray waits a hard-coded 30 s for each raylet to register; on a loaded 2-core machine that can run out, so
    # a node that timed out is torn down and started again (three tries) instead of failing every test.
    cluster = Cluster(initialize_head=False)
    nodes = [
        {"num_cpus": 4, "resources": {"node0": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False},
        {"num_cpus": 4, "resources": {"node1": 1}, "node_ip_address": "127.0.0.1"},
    ]
    for attempt in range(3):
        try:
            for args in nodes:
                cluster.add_node(**args)
            cluster.wait_for_nodes()
            break
        except Exception:
            cluster.shutdown()
            cluster = Cluster(initialize_head=False)
            if attempt == 2:
                raise
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=True)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3-protocol server on a free loopback port. Yields its endpoint URL.

    Credentials are dummies set in the environment so boto3 and pyarrow both sign requests.
    """
    port = free_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server; yields (endpoint_url, bucket_name)."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return s3_server, name


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _make_checkpoint(tmp_path_factory, preset: str):
    from llama4.checkpoint import create_checkpoint

    return create_checkpoint(preset, tmp_path_factory.mktemp(preset) / "ckpt", seed=0)


@pytest.fixture(scope="session")
def scout_tiny(tmp_path_factory) -> Path:
    """Folder of a `scout-tiny` checkpoint in the released HF layout (seed 0), made once per session."""
    return _make_checkpoint(tmp_path_factory, "scout-tiny")


@pytest.fixture(scope="session")
def maverick_tiny(tmp_path_factory) -> Path:
    """Folder of a `maverick-tiny` checkpoint (128 experts, dense/MoE interleave), made once per session."""
    return _make_checkpoint(tmp_path_factory, "maverick-tiny")

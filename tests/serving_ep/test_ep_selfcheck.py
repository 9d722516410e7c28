"""`python -m serving.expert_parallel.selfcheck`, the check ops run on a new cluster, run as they would run it:
a separate process joining the cluster. On CPU here (gloo, the two simulated nodes); on GPUs (NCCL) where a
machine has two or more."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def _selfcheck(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "serving.expert_parallel.selfcheck", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_selfcheck_on_the_two_node_cluster_cpu(ray_cluster):
    """As ops would run it: no checkpoint given, so it writes its small one on every node first."""
    r = _selfcheck("--address", ray_cluster.address, "-n", "4", "--tensor-parallel-size", "2",
                   "--nodes", "node0,node1")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    workers = [ln for ln in lines if ln.startswith("  rank ")]
    assert [w.split(":")[0].strip() for w in workers] == ["rank 0", "rank 1", "rank 2", "rank 3"]
    assert all(", cpu:" in w for w in workers)
    assert {w.split("ray node ")[1][:8] for w in workers[:2]} != {w.split("ray node ")[1][:8] for w in workers[2:]}
    assert "greedy tokens identical: yes" in r.stdout and lines[-1].startswith("OK:")


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda", "-n", "2"], "error: --device cuda with 2 workers needs 2 GPUs; the Ray cluster has 0"),
    (["-n", "3", "--tensor-parallel-size", "2"],
     "error: expert_parallel_size (3) must be a multiple of tensor_parallel_size (2)"),
], ids=["no-gpus", "uneven-nodes"])
def test_selfcheck_refuses_what_the_cluster_cannot_run(ray_cluster, maverick_tiny, args, message):
    r = _selfcheck("--address", ray_cluster.address, "--checkpoint", str(maverick_tiny), *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs two or more CUDA GPUs")
def test_selfcheck_cuda_nccl(maverick_tiny):
    r = _selfcheck("--checkpoint", str(maverick_tiny), "--device", "cuda", "-n", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cuda:0 gpu" in r.stdout and r.stdout.splitlines()[-1].startswith("OK:")

"""Layout checks that fail before any worker starts, with messages that say the fix."""
from __future__ import annotations

import pytest

from cluster.placement import PlacementMap
from llama4.config import TextConfig
from serving.expert_parallel.executor import build_ep_executor, node_slots, resolve_placement
from serving.expert_parallel.group import GroupSpec


@pytest.fixture(scope="module")
def cfg(maverick_tiny) -> TextConfig:
    return TextConfig.from_pretrained(maverick_tiny)


def test_default_placement_is_contiguous_over_nodes_and_workers(cfg):
    p = resolve_placement(None, cfg, GroupSpec(4, tensor_parallel_size=2))
    assert p.workers_per_node == (2, 2)
    assert p.experts_on(0, cfg.moe_layers[0]) == list(range(32))
    assert p.experts_on(3, cfg.moe_layers[-1]) == list(range(96, 128))


def test_placement_file_is_loaded_and_checked_against_the_layout(cfg, tmp_path):
    path = tmp_path / "placement.json"
    PlacementMap.contiguous(list(cfg.moe_layers), cfg.num_local_experts, 2, nodes=2, redundant=4).save(path)
    assert resolve_placement(str(path), cfg, GroupSpec(4, tensor_parallel_size=2)).copies(1, 0)[1].node == 1
    with pytest.raises(ValueError, match=r"workers_per_node \[2, 2\] but the group is 1 nodes x 4 workers"):
        resolve_placement(str(path), cfg, GroupSpec(4, tensor_parallel_size=4))
    other = PlacementMap.contiguous([0, 1], 16, 2, nodes=2)
    with pytest.raises(ValueError, match="planned for another model"):
        resolve_placement(other, cfg, GroupSpec(4, tensor_parallel_size=2))


def test_bad_arguments_are_refused_before_ray_starts(cfg, maverick_tiny):
    with pytest.raises(ValueError, match="use expert_parallel_size=2 for one node"):
        build_ep_executor(maverick_tiny, cfg, expert_parallel_size=1, tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"device 'cuda:1': expert-parallel workers run on 'cpu' or 'cuda'"):
        build_ep_executor(maverick_tiny, cfg, device="cuda:1")
    with pytest.raises(ValueError, match=r"device='cuda' needs num_gpus_per_worker > 0"):
        build_ep_executor(maverick_tiny, cfg, device="cuda", num_gpus_per_worker=0)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(4\) must divide the model's num_key_value_heads \(2\)"):
        build_ep_executor(maverick_tiny, cfg, expert_parallel_size=4, tensor_parallel_size=4)


def test_cuda_workers_on_a_cluster_without_gpus_fail_at_once(ray_cluster, cfg, maverick_tiny):
    """Not after the placement timeout: the two-node test cluster has no GPU, and the message says so."""
    import time

    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"needs 2 GPUs \(1 per worker\) but the Ray cluster has 0"):
        build_ep_executor(maverick_tiny, cfg, device="cuda", expert_parallel_size=2)
    assert time.monotonic() - t0 < 10


def test_kv_budget_is_per_worker_and_tensor_parallel_halves_a_sequence(cfg):
    import torch

    from serving.engine.kv_cache import plan_kv_cache

    per_seq = plan_kv_cache(cfg, 256, torch.float32, 1).bytes_per_sequence
    ep2, ep4 = GroupSpec(2), GroupSpec(4, tensor_parallel_size=2)
    assert node_slots(cfg, "float32", 256, 8, ep2) == 4  # no budget: max_num_seqs spread over 2 nodes
    assert node_slots(cfg, "float32", 256, 8, ep2, kv_cache_memory_bytes=3.5 * per_seq) == 3
    # Two workers per node hold half the KV heads each: the same budget holds twice the sequences.
    assert node_slots(cfg, "float32", 256, 8, ep4, kv_cache_memory_bytes=1.5 * per_seq) == 3
    with pytest.raises(ValueError, match=r"kv_cache_memory_bytes \(1000, per worker\) cannot hold one sequence"):
        node_slots(cfg, "float32", 256, 8, ep2, kv_cache_memory_bytes=1000)

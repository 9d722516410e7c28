"""Layout checks that fail before any worker starts, with messages that say the fix."""
from __future__ import annotations

import pytest

from cluster.placement import PlacementError, PlacementMap, resolve_placement
from llama4.config import TextConfig
from serving.config import EngineConfig
from serving.expert_parallel.executor import build_ep_executor, node_kv_plan


@pytest.fixture(scope="module")
def cfg(maverick_tiny) -> TextConfig:
    return TextConfig.from_pretrained(maverick_tiny)


def _resolve(placement, cfg, ep, tp):
    return resolve_placement(placement, list(cfg.moe_layers), cfg.num_local_experts, tp, ep // tp)


def test_default_placement_is_contiguous_over_nodes_and_workers(cfg):
    p = _resolve(None, cfg, 4, 2)
    assert p.workers_per_node == (2, 2)
    assert p.experts_on(0, cfg.moe_layers[0]) == list(range(32))
    assert p.experts_on(3, cfg.moe_layers[-1]) == list(range(96, 128))


def test_placement_file_is_loaded_and_checked_against_the_layout(cfg, tmp_path):
    path = tmp_path / "placement.json"
    PlacementMap.contiguous(list(cfg.moe_layers), cfg.num_local_experts, 2, nodes=2, redundant=4).save(path)
    assert _resolve(str(path), cfg, 4, 2).copies(1, 0)[1].node == 1
    with pytest.raises(PlacementError, match=r"on workers \[2, 2\] .* on workers \[4\] \(1 nodes x 4 workers\)"):
        _resolve(str(path), cfg, 4, 4)
    other = PlacementMap.contiguous([0, 1], 16, 2, nodes=2)
    with pytest.raises(PlacementError, match="planned for another model"):
        _resolve(other, cfg, 4, 2)


def test_bad_arguments_are_refused_before_ray_starts(maverick_tiny):
    def config(**kw):
        return EngineConfig.from_kwargs(maverick_tiny, **kw)

    with pytest.raises(ValueError, match="use expert_parallel_size=2 for one node"):
        config(expert_parallel_size=1, tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"device 'cuda:1': expert-parallel workers run on 'cpu' or 'cuda'"):
        config(device="cuda:1", expert_parallel_size=2)
    with pytest.raises(ValueError, match=r"device='cuda' needs num_gpus_per_worker > 0"):
        config(device="cuda", expert_parallel_size=2, num_gpus_per_worker=0)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(4\) must divide the model's num_key_value_heads \(2\)"):
        config(expert_parallel_size=4, tensor_parallel_size=4)
    with pytest.raises(ValueError, match=r"nodes lists 3 nodes but expert_parallel_size / tensor_parallel_size"):
        config(expert_parallel_size=4, tensor_parallel_size=2, nodes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"expert_parallel_size \(3\) does not divide the model's 128 experts"):
        config(expert_parallel_size=3)


def test_cuda_workers_on_a_cluster_without_gpus_fail_at_once(ray_cluster, cfg, maverick_tiny):
    """Not after the placement timeout: the two-node test cluster has no GPU, and the message says so."""
    import time

    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"needs 2 GPUs \(1 per worker\) but the Ray cluster has 0"):
        build_ep_executor(EngineConfig.from_kwargs(maverick_tiny, device="cuda", expert_parallel_size=2))
    assert time.monotonic() - t0 < 10


def test_kv_budget_is_per_worker_and_tensor_parallel_halves_a_sequence(cfg, maverick_tiny):
    from llama4.sizing import kv_bytes_per_token

    per_seq = kv_bytes_per_token(cfg, "fp32").sequence_bytes(256)

    def blocks(ep, tp=1, budget=None):
        plan = node_kv_plan(EngineConfig.from_kwargs(maverick_tiny, max_model_len=256, max_num_seqs=8,
                                                     expert_parallel_size=ep, tensor_parallel_size=tp,
                                                     kv_cache_memory_bytes=budget))
        return plan.global_blocks // 16  # in whole 256-token sequences

    assert blocks(2) == 4  # no budget: max_num_seqs spread over 2 nodes
    assert blocks(2, budget=3.5 * per_seq) == 3
    # Two workers per node hold half the KV heads each: the same budget holds twice the sequences.
    assert blocks(4, 2, budget=1.5 * per_seq) == 3
    with pytest.raises(ValueError, match=r"kv_cache_memory_bytes \(1000, per worker\) cannot hold one sequence"):
        blocks(2, budget=1000)

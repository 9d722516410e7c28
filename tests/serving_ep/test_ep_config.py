"""Layout checks that fail before any worker starts, with messages that say the fix."""
from __future__ import annotations

import pytest

from cluster.placement import PlacementMap
from llama4.config import TextConfig
from serving.expert_parallel.executor import build_ep_executor, resolve_placement
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
    with pytest.raises(ValueError, match="device 'cuda'"):
        build_ep_executor(maverick_tiny, cfg, device="cuda")
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(4\) must divide the model's num_key_value_heads \(2\)"):
        build_ep_executor(maverick_tiny, cfg, expert_parallel_size=4, tensor_parallel_size=4)

"""The expert-parallel group on the two-node test cluster, and one MoE layer's all-to-all exchange."""
from __future__ import annotations

import pytest
import torch

from cluster.placement import PlacementMap
from serving.expert_parallel.group import ExpertParallelGroup, GroupSpec
from serving.expert_parallel.layer_trial import reference, run_trial, worker_tokens
from serving.expert_parallel.worker import EPWorker

D, I, E = 32, 16, 16


@pytest.fixture(scope="module")
def group4(ray_cluster):
    """Two nodes x two workers, pinned with the cluster's node0/node1 resources."""
    group = ExpertParallelGroup(GroupSpec(4, tensor_parallel_size=2, nodes=["node0", "node1"], num_cpus=0.25),
                                EPWorker).start()
    yield group
    group.shutdown()


def _node_resource(ray_cluster, node_id: str) -> str:
    import ray

    res = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
    return next(k for k in ("node0", "node1") if k in res)


@pytest.mark.slow
def test_workers_are_placed_node_major_on_both_nodes(group4, ray_cluster):
    where = group4.placement
    assert [_node_resource(ray_cluster, p["node_id"]) for p in where] == ["node0", "node0", "node1", "node1"]
    assert len({p["pid"] for p in where}) == 4


@pytest.mark.slow
@pytest.mark.parametrize("K,T,redundant", [(1, [5, 7, 0, 3], 0), (2, [6, 1, 4, 9], 4)])
def test_exchange_equals_one_process_holding_every_expert(group4, K, T, redundant):
    """Uneven token counts, an idle worker, top-2 routing and replicated experts all give the exact answer."""
    placement = PlacementMap.contiguous([1], E, 2, nodes=2, redundant=redundant)
    out = group4.call("run", run_trial, placement.to_json(), 1, D, I, T, K, 0)
    held = [set(o["expert_ids"]) for o in out]
    assert set().union(*held) == set(range(E))
    for rank, o in enumerate(out):
        x_TD, idx_TK, scale_TK = worker_tokens(rank, T[rank], D, E, K, 0)
        assert o["y"].shape == (T[rank], D)
        torch.testing.assert_close(o["y"], reference(x_TD, idx_TK, scale_TK, D, I, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_rows_travel_bit_exact(group4):
    placement = PlacementMap.contiguous([1], E, 2, nodes=2)
    out = group4.call("run", run_trial, placement.to_json(), 1, D, I, 4, 1, 1, dtype="bfloat16")
    for rank, o in enumerate(out):
        x_TD, idx_TK, scale_TK = worker_tokens(rank, 4, D, E, 1, 1)
        want = reference(x_TD, idx_TK, scale_TK, D, I, 1)
        torch.testing.assert_close(o["y"], want, atol=0.05, rtol=0.05)  # bf16 compute, fp32 reference


@pytest.mark.slow
def test_an_existing_placement_group_is_used_and_left_in_place(ray_cluster):
    """As inside a Serve replica: bundle 0 is the caller's, the workers take the last ones."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    pg = placement_group([{"CPU": 0.1}, {"CPU": 0.25, "node0": 0.001}, {"CPU": 0.25, "node1": 0.001}])
    ray.get(pg.ready(), timeout=60)
    group = ExpertParallelGroup(GroupSpec(2, placement_group=pg, num_cpus=0.25), EPWorker).start()
    try:
        assert sorted(_node_resource(ray_cluster, p["node_id"]) for p in group.placement) == ["node0", "node1"]
        placement = PlacementMap.contiguous([1], E, 1, nodes=2)
        out = group.call("run", run_trial, placement.to_json(), 1, D, I, 3, 1, 2)
        for rank, o in enumerate(out):
            torch.testing.assert_close(o["y"], reference(*worker_tokens(rank, 3, D, E, 1, 2), D, I, 2))
    finally:
        group.shutdown()
    assert placement_group_table(pg)["state"] == "CREATED"  # not ours to remove
    remove_placement_group(pg)


def test_spec_rejects_a_layout_that_does_not_divide():
    with pytest.raises(ValueError, match=r"expert_parallel_size \(3\) must be a multiple of tensor_parallel_size \(2\)"):
        GroupSpec(3, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="nodes lists 3 nodes"):
        GroupSpec(4, tensor_parallel_size=2, nodes=["a", "b", "c"])

"""The expert placement map: default layout, lookups both ways, JSON round trip, and rejection of bad maps."""
from __future__ import annotations

import json

import pytest

from cluster.placement import ExpertCopy, PlacementError, PlacementMap


def test_contiguous_layout_node_major():
    pm = PlacementMap.contiguous([1, 3], num_experts=128, workers_per_node=2, nodes=2)
    assert pm.num_workers == 4 and pm.moe_layers == [1, 3]
    assert pm.experts_on(0, 1) == list(range(0, 32))
    assert pm.experts_on(2, 3) == list(range(64, 96))  # rank 2 = node 1, worker 0
    assert pm.copies(1, 70) == [ExpertCopy(node=1, worker=0, slot=6)]
    assert pm.copies(3, 127) == [ExpertCopy(node=1, worker=1, slot=31)]
    assert pm.max_slots_per_worker() == 32 and pm.is_uniform()


def test_uneven_nodes_and_uneven_blocks():
    pm = PlacementMap.contiguous([0], num_experts=10, workers_per_node=[1, 3], nodes=2)
    assert [len(pm.experts_on(r, 0)) for r in range(4)] == [3, 3, 2, 2]
    assert pm.experts_on(1, 0) == [3, 4, 5] and pm.copies(0, 3) == [ExpertCopy(1, 0, 0)]
    with pytest.raises(PlacementError, match="lists 2 nodes but nodes is 3"):
        PlacementMap.contiguous([0], 10, [1, 3], nodes=3)


def test_redundant_copies_land_on_other_workers():
    pm = PlacementMap.contiguous([1], num_experts=128, workers_per_node=8, nodes=3, redundant=16)
    assert pm.max_slots_per_worker() == 6  # (128 + 16) / 24
    first, second = pm.copies(1, 0)
    assert pm.rank(first.node, first.worker) != pm.rank(second.node, second.worker)
    assert pm.experts_on(23, 1) == [10, 11, 12, 13, 14, 15]


def test_json_round_trip_and_file(tmp_path):
    pm = PlacementMap.contiguous([1, 3, 5], num_experts=16, workers_per_node=[2, 2], nodes=2, redundant=4)
    back = PlacementMap.from_json(pm.to_json())
    assert back == pm
    assert back.to_dict() == json.loads(pm.to_json())
    for layer in pm.moe_layers:
        for r in range(pm.num_workers):
            assert back.experts_on(r, layer) == pm.experts_on(r, layer)
        for e in range(16):
            assert back.copies(layer, e) == pm.copies(layer, e)
    pm.save(tmp_path / "placement.json")
    assert PlacementMap.load(tmp_path / "placement.json") == pm
    d = json.loads((tmp_path / "placement.json").read_text())
    assert d["format"] == "herd.placement/v1" and d["workers_per_node"] == [2, 2]
    assert d["layers"]["1"][0] == [{"node": 0, "worker": 0, "slot": 0}, {"node": 1, "worker": 1, "slot": 1}]


def test_a_hand_written_map_with_a_hot_expert_copied():
    layers = {1: [[ExpertCopy(0, 0, 0), ExpertCopy(0, 1, 1)], [ExpertCopy(0, 1, 0)]]}
    pm = PlacementMap(2, [2], layers)
    assert pm.experts_on(0, 1) == [0] and pm.experts_on(1, 1) == [1, 0]  # slot order
    assert not PlacementMap(2, [2], {1: layers[1], 3: [[ExpertCopy(0, 1, 0)], [ExpertCopy(0, 0, 0)]]}).is_uniform()


def _doc(**over):
    d = PlacementMap.contiguous([1], num_experts=4, workers_per_node=2, nodes=1).to_dict()
    d.update(over)
    return d


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["layers"]["1"].__setitem__(2, []), "layer 1: expert 2 has no copy"),
    (lambda d: d["layers"]["1"][3].__setitem__(0, {"node": 0, "worker": 1, "slot": 0}),
     "layer 1: node 0 worker 1 slot 0 is used twice"),
    (lambda d: d["layers"]["1"][3].__setitem__(0, {"node": 1, "worker": 0, "slot": 0}),
     "expert 3 placed on node 1 worker 0, which does not exist"),
    (lambda d: d["layers"]["1"][3].__setitem__(0, {"node": 0, "worker": 1, "slot": 5}),
     "uses slots \\[0, 5\\]; slots must be 0..1 with no gaps"),
    (lambda d: d["layers"]["1"].pop(), "layer 1: 3 experts listed, expected 4"),
    (lambda d: d.pop("format"), "not a placement map"),
    (lambda d: d["layers"]["1"][0][0].pop("slot"), "malformed placement map: KeyError"),
])
def test_load_rejects_broken_maps(mutate, message):
    d = _doc()
    mutate(d)
    with pytest.raises(PlacementError, match=message):
        PlacementMap.from_json(json.dumps(d))


def test_lookups_out_of_range():
    pm = PlacementMap.contiguous([1], num_experts=4, workers_per_node=2, nodes=1)
    with pytest.raises(KeyError, match="layer 2 is not a MoE layer"):
        pm.experts_on(0, 2)
    with pytest.raises(KeyError, match="worker rank 2 out of range"):
        pm.experts_on(2, 1)

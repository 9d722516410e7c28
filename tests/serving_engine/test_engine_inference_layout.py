"""Serving-speed choices that must not change results: the post-load weight re-layout and paged cache reads."""
from __future__ import annotations

import torch

from herd_testing import SlotTables
from serving.loader import load_model


def _prefill(model, tables: SlotTables, slot_ids: dict[int, list[int]]) -> None:
    """Each prompt piecewise at attention-chunk boundaries, as the scheduler does."""
    chunk = model.cfg.attention_chunk_size
    for slot, ids in slot_ids.items():
        for start in range(0, len(ids), chunk):
            model(tables.batch([(slot, ids[start:start + chunk], start, True)]))


def test_optimize_keeps_names_shapes_values_and_logits(maverick_tiny, prompts):
    plain = load_model(maverick_tiny, optimize=False)
    fast = load_model(maverick_tiny)  # the serving default re-lays the weights
    names = [(n, tuple(p.shape)) for n, p in plain.named_parameters()]
    assert [(n, tuple(p.shape)) for n, p in fast.named_parameters()] == names
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert torch.equal(a, b), name
    q = fast.layers[0].self_attn.q_proj.weight
    assert q.stride() == (1, q.shape[0])  # [out, in] shape, [in, out] storage
    experts = fast.layers[fast.cfg.moe_layers[0]].feed_forward.experts
    assert experts.gate_up_proj.is_contiguous()  # the checkpoint's fused [in, out] layout, as EP reads it
    ids = {0: prompts(40, seed=1), 1: prompts(40, seed=2)}
    steps = []
    for m in (plain, fast):
        tables = SlotTables(m, 2, 64)
        _prefill(m, tables, ids)
        steps.append(m(tables.batch([(0, [5], 40, True), (1, [9], 40, True)])))
    assert (steps[0] - steps[1]).abs().max().item() < 1e-5


def test_decode_over_scattered_blocks_equals_one_sequence_at_a_time(maverick_tiny, prompts):
    """Block tables in any order (a busy pool hands blocks out scattered), sequences batched in any order: every
    decode row equals that sequence decoded alone."""
    model = load_model(maverick_tiny)
    tables = SlotTables(model, 6, 96, shuffle=True)
    lengths = {0: 33, 1: 50, 2: 20, 4: 41, 5: 64}  # cross the 32-token chunk on RoPE layers
    prompt = {s: prompts(n, seed=10 + s) for s, n in lengths.items()}
    _prefill(model, tables, prompt)
    solo = {s: model(tables.batch([(s, [7 + s], n, True)])) for s, n in lengths.items()}
    for slots in ([0, 1, 2], [2, 0, 1], [5, 4], [5, 0, 4, 2]):
        got = model(tables.batch([(s, [7 + s], lengths[s], True) for s in slots]))  # same entries, same values
        want = torch.cat([solo[s] for s in slots])
        assert (got - want).abs().max().item() < 1e-5, slots

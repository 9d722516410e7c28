"""Serving-speed choices that must not change results: the post-load weight re-layout and the decode cache reads."""
from __future__ import annotations

import torch

from serving.loader import load_model
from serving.model import Batch


def _prefill(model, slot_ids: dict[int, list[int]]) -> None:
    """Each prompt piecewise at attention-chunk boundaries, as the scheduler does."""
    chunk = model.cfg.attention_chunk_size
    for slot, ids in slot_ids.items():
        for start in range(0, len(ids), chunk):
            model(Batch.build([(slot, ids[start:start + chunk], start, True)], "cpu", chunk))


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
    for m in (plain, fast):
        m.allocate_kv_cache(2, 64)
        _prefill(m, ids)
    step = Batch.build([(0, [5], 40, True), (1, [9], 40, True)], "cpu", fast.cfg.attention_chunk_size)
    assert (plain(step) - fast(step)).abs().max().item() < 1e-5


def test_decode_reads_any_slot_order_like_one_sequence_at_a_time(maverick_tiny, prompts):
    """Slots forming a range (any order) read one cache slice, others go through index_select: all equal solo."""
    model = load_model(maverick_tiny)
    chunk = model.cfg.attention_chunk_size
    model.allocate_kv_cache(6, 96)
    lengths = {0: 33, 1: 50, 2: 20, 4: 41, 5: 64}  # cross the 32-token chunk on RoPE layers
    prompt = {s: prompts(n, seed=10 + s) for s, n in lengths.items()}
    _prefill(model, prompt)
    solo = {s: model(Batch.build([(s, [7 + s], n, True)], "cpu", chunk)) for s, n in lengths.items()}
    for slots, in_place in (([0, 1, 2], True), ([2, 0, 1], True), ([5, 4], True), ([5, 0, 4, 2], False)):
        batch = Batch.build([(s, [7 + s], lengths[s], True) for s in slots], "cpu", chunk)
        assert (batch.decode_slot_start is not None) == in_place
        got = model(batch)  # rewrites the same cache entries with the same values
        want = torch.cat([solo[s] for s in slots])
        assert (got - want).abs().max().item() < 1e-5, slots

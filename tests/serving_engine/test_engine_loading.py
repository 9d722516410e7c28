"""Loading: lenient config.json forms, text-only and released layouts, expert subsets, and no pickles."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from llama4.checkpoint import CheckpointError
from llama4.config import TextConfig
from serving.loader import load_model, load_routed_experts


def _copy_with_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["text_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _logits(model, ids):
    from herd_testing import SlotTables

    return model(SlotTables(model, 1, 64).batch([(0, ids, 0, True)]))


def _released_form(t):
    """As Meta released it: int temperature tuning, rope_theta + rope_scaling, no derived lists."""
    t["attn_temperature_tuning"] = 4
    t.pop("moe_layers", None)
    t["no_rope_layers"] = []
    t.pop("layer_types", None)


def _rope_parameters_form(t):
    """As transformers 5 writes it: rope_parameters holding theta and scaling."""
    t["rope_parameters"] = {"rope_theta": t.pop("rope_theta"), **(t.pop("rope_scaling") or {"rope_type": "default"})}


@pytest.mark.parametrize("edit", [_released_form, _rope_parameters_form])
def test_lenient_config_forms_load_the_same_model(scout_tiny, tmp_path, edit):
    base = TextConfig.from_pretrained(scout_tiny)
    variant = _copy_with_config(scout_tiny, tmp_path / "variant", edit)
    cfg = TextConfig.from_pretrained(variant)
    assert cfg.attn_temperature_tuning is True and cfg.rope_scaling == base.rope_scaling
    assert cfg.rope_theta == base.rope_theta and cfg.moe_layers == base.moe_layers
    assert cfg.rope_layers == base.rope_layers and not cfg.rope_layers[3]
    ids = list(range(5, 37))  # one whole chunk; the last position reaches floor_scale
    assert torch.equal(_logits(load_model(variant), ids), _logits(load_model(scout_tiny), ids))


def test_pickled_weights_are_refused(tmp_path, scout_tiny):
    shutil.copy(scout_tiny / "config.json", tmp_path / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(tmp_path)


def test_mismatched_config_names_the_tensor(scout_tiny, tmp_path):
    variant = _copy_with_config(scout_tiny, tmp_path / "v", lambda t: t.update(intermediate_size_mlp=999))
    variant_cfg = TextConfig.from_pretrained(variant)
    assert variant_cfg.intermediate_size_mlp == 999
    with pytest.raises(CheckpointError, match="config and weights disagree"):
        # scout-tiny is MoE on every layer: change the expert size instead to hit a tensor
        load_model(_copy_with_config(scout_tiny, tmp_path / "w", lambda t: t.update(intermediate_size=48)))


def test_expert_subsets_read_only_their_experts(maverick_tiny):
    full = load_model(maverick_tiny)
    wanted = [3, 64, 127, 5]
    part = load_model(maverick_tiny, expert_ids=lambda layer: wanted)
    layer = full.cfg.moe_layers[0]
    got, ref = part.layers[layer].feed_forward.experts, full.layers[layer].feed_forward.experts
    assert got.expert_ids == wanted and got.gate_up_proj.shape[0] == 4
    assert torch.equal(got.gate_up_proj, ref.gate_up_proj[wanted])
    alone = load_routed_experts(maverick_tiny, layer, wanted)
    assert torch.equal(alone.down_proj, ref.down_proj[wanted])
    # Tokens routed to experts held elsewhere contribute zero; held ones match the full module.
    x = torch.randn(6, full.cfg.hidden_size)
    idx = torch.tensor([[3], [10], [127], [5], [64], [11]])
    w = torch.rand(6, 1)
    y_part, y_full = alone(x, idx, w), ref(x, idx, w)
    held = torch.tensor([True, False, True, True, True, False])
    assert torch.allclose(y_part[held], y_full[held], atol=1e-6) and (y_part[~held] == 0).all()
    with pytest.raises(ValueError, match="not an MoE layer"):
        load_routed_experts(maverick_tiny, 0, wanted)


def test_bfloat16_engine_runs_close_to_float32(maverick_tiny):
    from serving.engine import LLMEngine, SamplingParams

    f32 = load_model(maverick_tiny, "float32")
    bf16 = load_model(maverick_tiny, "bfloat16")
    assert bf16.layers[1].feed_forward.experts.gate_up_proj.dtype == torch.bfloat16
    ids = list(range(10, 42))
    a, b = _logits(f32, ids), _logits(bf16, ids)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.25 * a.abs().max()
    engine = LLMEngine.from_pretrained(maverick_tiny, dtype="bfloat16", max_num_seqs=2, max_model_len=128)
    out = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5

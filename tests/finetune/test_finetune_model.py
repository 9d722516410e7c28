"""LoRA placement on transformers' Llama 4: attention, shared expert, routed experts (fused tensors), router frozen."""
from __future__ import annotations

import pytest
import torch

from finetune.model import build_peft_model, lora_config
from finetune.schema import LoraSpec, LoraTargets


@pytest.fixture(scope="module")
def peft_model(maverick_tiny):
    return build_peft_model(maverick_tiny, LoraSpec(rank=4, alpha=8))


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_on_attention_shared_and_routed_experts_router_frozen(peft_model):
    names = _trainable(peft_model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    moe = "base_model.model.model.layers.1.feed_forward"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"base_model.model.model.layers.0.self_attn.{proj}.lora_A.default.weight" in names
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert f"{moe}.shared_expert.{proj}.lora_A.default.weight" in names
    # The fused expert tensors (gate_up_proj and down_proj) each get a LoRA pair through target_parameters.
    assert {f"{moe}.experts.lora_A.default.weight", f"{moe}.experts.base_layer.lora_A.default.weight"} <= names
    assert not any(".router." in n for n in names)
    assert not any("layers.0.feed_forward" in n for n in names)  # dense MLP is off by default


def test_dense_mlp_target_does_not_catch_the_shared_expert():
    cfg = lora_config(LoraSpec(targets=LoraTargets(attention=False, shared_expert=False, routed_experts=False,
                                                   dense_mlp=True)))
    import re

    assert re.fullmatch(cfg.target_modules, "model.layers.0.feed_forward.gate_proj")
    assert not re.fullmatch(cfg.target_modules, "model.layers.1.feed_forward.shared_expert.gate_proj")
    assert cfg.target_parameters is None


def test_fresh_adapter_leaves_the_base_output_unchanged(peft_model, maverick_tiny):
    from transformers import Llama4ForCausalLM

    base = Llama4ForCausalLM.from_pretrained(maverick_tiny, dtype=torch.float32)
    ids = torch.tensor([[2048, 300, 301, 302, 303, 304]])
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, base(input_ids=ids).logits)

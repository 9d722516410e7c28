"""The model a job trains: transformers' Llama 4 text model from a herd/HF checkpoint, with PEFT LoRA attached.

LoRA goes on the attention projections, the shared expert, optionally the dense MLP of non-MoE layers, and the
routed experts. The routed experts are stored fused, with no `.weight` suffix (`feed_forward.experts.gate_up_proj`
[E, hidden, 2*I] and `feed_forward.experts.down_proj` [E, I, hidden]), so PEFT reaches them through
`target_parameters` rather than `target_modules`. The router (`feed_forward.router`) is never targeted and stays
frozen: moving the routing while adapting experts destabilises the MoE.
"""
from __future__ import annotations

from pathlib import Path

import torch

from finetune.schema import LoraSpec

ROUTED_EXPERT_PARAMS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
_ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|o_proj)"
_SHARED = r"feed_forward\.shared_expert\.(gate_proj|up_proj|down_proj)"
_DENSE = r"feed_forward\.(gate_proj|up_proj|down_proj)"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lora_config(spec: LoraSpec):
    """The PEFT `LoraConfig` for a job's LoRA settings (module names of transformers' Llama 4 text model)."""
    from peft import LoraConfig

    t = spec.targets
    parts = [p for on, p in ((t.attention, _ATTENTION), (t.shared_expert, _SHARED), (t.dense_mlp, _DENSE)) if on]
    # A regex string is matched against the full module name: `layers.N.feed_forward.gate_proj` (dense MLP) must
    # not also catch `layers.N.feed_forward.shared_expert.gate_proj`, which a suffix list would.
    target_modules = rf".*\.layers\.\d+\.({'|'.join(parts)})" if parts else []
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_modules,
        target_parameters=list(ROUTED_EXPERT_PARAMS) if t.routed_experts else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_base(path: str | Path, dtype: str = "float32"):
    """transformers' `Llama4ForCausalLM` from a checkpoint folder (released multimodal or text-only layout)."""
    from transformers import Llama4ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the vision tower's keys are "unexpected" for the text model: expected
    model = Llama4ForCausalLM.from_pretrained(str(path), dtype=_DTYPES[dtype])
    model.config.use_cache = False
    return model


def build_peft_model(path: str | Path, spec: LoraSpec, dtype: str = "float32", seed: int = 0):
    """The base model with fresh LoRA adapters (seeded), base weights and router frozen."""
    from peft import get_peft_model

    base = load_base(path, dtype)
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(spec))
    frozen_router = [n for n, p in model.named_parameters() if ".router." in n and p.requires_grad]
    assert not frozen_router, f"router parameters must stay frozen: {frozen_router[:2]}"
    return model


def trainable_summary(model) -> str:
    """'trainable 123 / 4567 parameters (2.7%)' for the job log."""
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions: the full count)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"

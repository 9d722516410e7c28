"""An adapter as finetune/ writes it (PEFT `save_pretrained`, every target kind incl. the fused routed experts),
with random non-zero factors so merging visibly changes the answer, and PEFT's own merge as the reference."""
from __future__ import annotations

import pytest
import torch

TARGETS = (r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|feed_forward\.shared_expert\."
           r"(gate_proj|up_proj|down_proj)|feed_forward\.(gate_proj|up_proj|down_proj))")


def make_adapter(base_path, out, seed: int = 0, **overrides):
    """A PEFT LoRA adapter on `base_path` with random factors (B is not zero), saved to `out`; returns the model."""
    from peft import LoraConfig, get_peft_model

    from finetune.model import ROUTED_EXPERT_PARAMS, load_base

    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM",
                  target_parameters=list(ROUTED_EXPERT_PARAMS), init_lora_weights=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_path), LoraConfig(**kwargs))
    with torch.no_grad():  # PEFT's random init is small; scale B up so the adapter changes greedy tokens
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="package")
def adapter_dir(maverick_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    make_adapter(maverick_tiny, out)
    return out


@pytest.fixture(scope="package")
def peft_model(maverick_tiny, adapter_dir):
    """transformers + PEFT with the saved adapter, loaded the standard way (unmerged)."""
    from peft import PeftModel

    from finetune.model import load_base

    return PeftModel.from_pretrained(load_base(maverick_tiny), str(adapter_dir)).eval()


@pytest.fixture(scope="package")
def peft_merged_state(maverick_tiny, adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of the same adapter: the reference for herd's merged tensors."""
    from peft import PeftModel

    from finetune.model import load_base

    merged = PeftModel.from_pretrained(load_base(maverick_tiny), str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}

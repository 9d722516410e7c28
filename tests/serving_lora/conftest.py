"""An adapter as finetune/ writes it (PEFT `save_pretrained`, every target kind incl. the fused routed experts),
with random non-zero factors so merging visibly changes the answer, and PEFT's own merge as the reference."""
from __future__ import annotations

import pytest
import torch

from herd_testing import make_adapter


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

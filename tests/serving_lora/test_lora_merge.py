"""serving.lora merges a PEFT adapter into checkpoint tensors exactly as PEFT's own merge_and_unload does,
reading only the rows asked for, and refuses what it cannot merge with a message saying why."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from llama4.checkpoint import CheckpointReader
from serving.lora import LoraAdapter, LoraError, MergedReader


def test_every_merged_tensor_equals_peft_merge(maverick_tiny, adapter_dir, peft_merged_state):
    adapter = LoraAdapter.load(adapter_dir)
    reader = MergedReader(CheckpointReader(maverick_tiny), adapter)
    kinds = {n.split(".")[-2] if n.endswith(".weight") else n.split(".")[-1] for n in adapter.factors}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"}
    for name in adapter.factors:
        got, base, want = reader.get(name), reader.reader.get(name), peft_merged_state[name]
        assert (got - want).abs().max().item() < 1e-6, name
        assert (got - base).abs().max().item() > 1e-3, name  # the adapter really changes it
    reader.check_all_merged()
    untouched = "model.layers.1.feed_forward.router.weight"
    assert torch.equal(reader.get(untouched), peft_merged_state[untouched])


def test_rows_merge_only_what_is_read(maverick_tiny, adapter_dir, peft_merged_state):
    """An expert-parallel worker reads some experts; a tensor-parallel one some output rows."""
    reader = MergedReader(CheckpointReader(maverick_tiny), LoraAdapter.load(adapter_dir))
    for name in ("model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.1.feed_forward.experts.down_proj"):
        ids = [3, 64, 127]
        assert (reader.get_rows(name, ids) - peft_merged_state[name][ids]).abs().max().item() < 1e-6
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (reader.get_rows(q, range(8, 24)) - peft_merged_state[q][8:24]).abs().max().item() < 1e-6


def test_an_adapter_for_another_model_is_refused(scout_tiny, adapter_dir):
    adapter = LoraAdapter.load(adapter_dir)
    reader = MergedReader(CheckpointReader(scout_tiny), adapter)
    shared = [n for n in adapter.factors if reader.has(n)]
    with pytest.raises(LoraError, match=r"gate_up_proj: lora_A \(512, 64\) / lora_B \(64, 512\) do not fit the "
                                        r"checkpoint's \(16, 64, 64\); was the adapter trained on another model"):
        reader.get("model.layers.1.feed_forward.experts.gate_up_proj")
    assert len(shared) < len(adapter.factors)  # maverick's dense layers: scout has none
    with pytest.raises(LoraError, match="modifies model.layers.0.feed_forward.down_proj.weight .* which this "
                                        "checkpoint does not have"):
        reader.check_all_merged()


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA adapters do not merge"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
])
def test_unmergeable_configs_are_refused(adapter_dir, tmp_path, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(change)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraError, match=f"herd cannot serve this adapter: {message}"):
        LoraAdapter.load(bad)


def test_missing_or_pickled_adapter_files(tmp_path, adapter_dir):
    with pytest.raises(LoraError, match="no adapter_config.json; give the folder a PEFT `save_pretrained` wrote"):
        LoraAdapter.load(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LoraError, match="only pickled adapter_model.bin; herd loads safetensors only"):
        LoraAdapter.load(pickled)

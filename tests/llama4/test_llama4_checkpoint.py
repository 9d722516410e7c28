"""The checkpoint factory writes the released Llama 4 layout, deterministically, and herd reads it back."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from herd.cli import main as herd_main
from llama4.checkpoint import CheckpointError, CheckpointReader, create_checkpoint
from llama4.config import TextConfig
from llama4.presets import PRESETS
from llama4.sizing import param_counts
from llama4.tokenizer import special_tokens


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fixture", ["scout_tiny", "maverick_tiny"])
def test_transformers_loads_with_no_missing_or_unexpected_keys(fixture, request):
    from transformers import Llama4ForConditionalGeneration

    path = request.getfixturevalue(fixture)
    model, info = Llama4ForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    cfg = TextConfig.from_pretrained(path)
    assert model.config.text_config.num_local_experts == cfg.num_local_experts
    assert list(model.config.text_config.moe_layers) == list(cfg.moe_layers)


def test_released_file_layout(maverick_tiny):
    names = {p.name for p in maverick_tiny.iterdir()}
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for required in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "generation_config.json"):
        assert required in names
    index = json.loads((maverick_tiny / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == set(shards)
    assert "language_model.model.layers.1.feed_forward.experts.gate_up_proj" in index
    assert "language_model.model.layers.0.feed_forward.gate_proj.weight" in index  # dense even layer
    assert "language_model.lm_head.weight" in index
    assert any(k.startswith("vision_model.") for k in index)
    assert any(k.startswith("multi_modal_projector.") for k in index)
    config = json.loads((maverick_tiny / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForConditionalGeneration"]
    r = CheckpointReader(maverick_tiny)
    t = config["text_config"]
    E, H, I = t["num_local_experts"], t["hidden_size"], t["intermediate_size"]
    assert E == 128
    assert tuple(r.get("model.layers.1.feed_forward.experts.gate_up_proj").shape) == (E, H, 2 * I)
    assert tuple(r.get("model.layers.1.feed_forward.experts.down_proj").shape) == (E, I, H)


def test_chat_template_renders_llama4_prompt_format(scout_tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scout_tiny)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi there<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids.count(tok.convert_tokens_to_ids("<|header_start|>")) == 2


def test_special_tokens_are_all_present_and_read_from_files(scout_tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scout_tiny)
    vocab = tok.get_vocab()
    specials = special_tokens()
    assert len(specials) == 2048 and len(set(specials)) == 2048
    for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>",
              "<|image|>", "<|patch|>", "<|image_start|>", "<|image_end|>", "<|python_start|>",
              "<|finetune_right_pad|>", "<|tile_x_separator|>", "<|reasoning_thinking_start|>"):
        assert t in vocab and tok.encode(t, add_special_tokens=False) == [vocab[t]]
    gen = json.loads((scout_tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [vocab["<|end_of_text|>"], vocab["<|eom|>"], vocab["<|eot|>"]]
    cfg = json.loads((scout_tiny / "config.json").read_text())
    # As released: <|image|> at 200090, <|patch|> at 200092, which config.json names as the image token.
    first_special = vocab["<|begin_of_text|>"]
    assert vocab["<|image|>"] - first_special == 90 and vocab["<|patch|>"] - first_special == 92
    assert cfg["image_token_index"] == vocab["<|patch|>"]
    assert cfg["boi_token_index"] == vocab["<|image_start|>"] and cfg["eoi_token_index"] == vocab["<|image_end|>"]
    assert cfg["text_config"]["vocab_size"] == len(vocab) == 4096
    # A multi-byte round trip through the byte-level BPE.
    s = "café 日本語 🙂 naïve"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a = create_checkpoint("scout-tiny", tmp_path / "a", seed=7)
    b = create_checkpoint("scout-tiny", tmp_path / "b", seed=7)
    c = create_checkpoint("scout-tiny", tmp_path / "c", seed=8)
    assert _digest(a) == _digest(b)
    da, dc = _digest(a), _digest(c)
    assert da["tokenizer.json"] == dc["tokenizer.json"]
    assert da["model-00001-of-00003.safetensors"] != dc["model-00001-of-00003.safetensors"]


@pytest.mark.parametrize("name,total,active", [("scout", 107.8e9, 17.2e9), ("maverick", 400.7e9, 17.2e9)])
def test_released_parameter_counts(name, total, active):
    counts = param_counts(PRESETS[name].text_config())
    assert abs(counts.total - total) / total < 0.01
    assert abs(counts.active - active) / active < 0.01


def test_maverick_preset_structure():
    cfg = PRESETS["maverick"].text_config()
    assert cfg.moe_layers == tuple(range(1, 48, 2)) and cfg.num_local_experts == 128
    assert not cfg.use_qk_norm and cfg.rope_scaling is None
    assert [i for i, r in enumerate(cfg.rope_layers) if not r] == list(range(3, 48, 4))
    scout = PRESETS["scout"].text_config()
    assert scout.moe_layers == tuple(range(48)) and scout.use_qk_norm
    assert scout.rope_scaling.low_freq_factor == scout.rope_scaling.high_freq_factor == 1.0
    tiny = PRESETS["maverick-tiny"].text_config()
    assert tiny.num_local_experts == 128 and tiny.moe_layers == (1, 3) and tiny.attention_chunk_size == 32


def test_config_reader_accepts_released_and_new_key_forms():
    released = {
        "text_config": {
            "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 8, "intermediate_size_mlp": 16,
            "num_local_experts": 4, "interleave_moe_layer_step": 2, "attn_temperature_tuning": 4,
            "rope_theta": 500000.0, "no_rope_layers": [], "moe_layers": None,
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
            "eos_token_id": [1, 2],
        }
    }
    cfg = TextConfig.from_dict(released)
    assert cfg.attn_temperature_tuning is True
    assert cfg.moe_layers == (1, 3) and cfg.rope_layers == (True, True, True, False)
    assert cfg.rope_scaling.factor == 16.0 and cfg.eos_token_ids == (1, 2)
    newer = dict(released["text_config"])
    newer.pop("rope_theta"), newer.pop("rope_scaling")
    newer["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 250000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}
    newer["layer_types"] = ["chunked_attention", "full_attention", "chunked_attention", "full_attention"]
    cfg2 = TextConfig.from_dict(newer)
    assert cfg2.rope_theta == 250000.0 and cfg2.rope_scaling.high_freq_factor == 4.0
    assert cfg2.rope_layers == (True, False, True, False)


def test_reader_slices_experts_without_the_rest(maverick_tiny):
    r = CheckpointReader(maverick_tiny)
    name = "model.layers.3.feed_forward.experts.down_proj"
    full = r.get(name)
    assert torch.equal(r.get_rows(name, range(32, 64)), full[32:64])
    assert torch.equal(r.get_rows(name, [5, 9, 100]), full[[5, 9, 100]])


def test_reader_refuses_pickled_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="safetensors only"):
        CheckpointReader(tmp_path)


def test_cli_creates_checkpoint_and_reports_bad_input_in_one_line(tmp_path, capsys):
    assert herd_main(["checkpoint", "create", "--preset", "maverick-tiny", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert herd_main(["checkpoint", "create", "--preset", "maverik-tiny", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'maverick-tiny'" in err and err.startswith("herd: error: --preset")
    assert herd_main(["checkpoint", "create", "--preset", "maverick", str(tmp_path / "y")]) == 2
    assert "planning only" in capsys.readouterr().err
    assert herd_main(["checkpoint", "create", "--preset", "maverick-tiny", str(tmp_path / "m")]) == 2
    assert "--force" in capsys.readouterr().err


def test_ensure_checkpoint_writes_once_and_completes_a_half_written_folder(tmp_path):
    from llama4.checkpoint import ensure_checkpoint

    path = ensure_checkpoint("scout-tiny", tmp_path / "c")
    before = _digest(path)
    marker = path / "config.json"
    mtime = marker.stat().st_mtime_ns
    assert ensure_checkpoint("scout-tiny", path) == path and marker.stat().st_mtime_ns == mtime  # left alone
    (path / "model.safetensors.index.json").unlink()  # as if interrupted before the index was written
    ensure_checkpoint("scout-tiny", path)
    assert _digest(path) == before


@pytest.mark.parametrize("fixture", ["scout_tiny", "maverick_tiny"])
def test_vision_tower_runs_in_transformers(fixture, request):
    """transformers' own vision modules run on the small presets: features [tiles, tokens per tile, D_text]."""
    from transformers import Llama4ForConditionalGeneration

    path = request.getfixturevalue(fixture)
    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    v = model.config.vision_config
    assert v.intermediate_size == v.hidden_size / v.pixel_shuffle_ratio ** 2
    pixel_values = torch.randn(7, 3, v.image_size, v.image_size)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values).last_hidden_state
        projected = model.multi_modal_projector(features)
    per_tile = (v.image_size // v.patch_size) ** 2 * v.pixel_shuffle_ratio ** 2
    assert projected.shape == (7, per_tile, model.config.text_config.hidden_size)
    assert torch.isfinite(projected).all() and projected.std() > 0.1


def test_processor_files_as_released(maverick_tiny):
    pre = json.loads((maverick_tiny / "preprocessor_config.json").read_text())
    vision = json.loads((maverick_tiny / "config.json").read_text())["vision_config"]
    assert pre["size"] == {"height": vision["image_size"], "width": vision["image_size"]}
    assert pre["max_patches"] == 16 and pre["resample"] == 2 and pre["image_mean"] == [0.5] * 3
    assert pre["processor_class"] == "Llama4Processor" and pre["resize_to_max_canvas"] is False
    proc = json.loads((maverick_tiny / "processor_config.json").read_text())
    assert proc["image_token"] == proc["fake_image_token"] == "<|image|>"
    assert proc["patch_size"] == vision["patch_size"]
    template = json.loads((maverick_tiny / "chat_template.json").read_text())["chat_template"]
    assert "{{- '<|image|>' }}" in template
    assert json.loads((maverick_tiny / "tokenizer_config.json").read_text())["chat_template"] == template


def test_chat_template_renders_image_parts(maverick_tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(maverick_tiny)
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>What is this?<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n")

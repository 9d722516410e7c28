"""herd's vision encoder + projector (serving/vision.py) equals transformers' modules in fp32 within 1e-4."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from serving.vision import VisionConfig, load_vision_tower

WIDER_VISION = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "image_size": 112, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 96,
                "projector_output_dim": 96, "vision_output_dim": 96}


@pytest.fixture(scope="module")
def wider_tower_ckpt(tmp_path_factory):
    """scout-tiny's text model with a two-layer, four-head vision tower on 112-px tiles (8x8 patches)."""
    from llama4.checkpoint import create_checkpoint
    from llama4.presets import PRESETS

    preset = dataclasses.replace(PRESETS["scout-tiny"], name="scout-tiny-wider-vision", vision=WIDER_VISION)
    return create_checkpoint(preset, tmp_path_factory.mktemp("wider") / "ckpt", seed=3)


def _reference(path, pixel_values):
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixel_values.float()).last_hidden_state
        return model.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))


@pytest.mark.parametrize("fixture,tiles", [("maverick_tiny", 7), ("wider_tower_ckpt", 3)])
def test_vision_tower_equals_transformers(fixture, tiles, request):
    path = request.getfixturevalue(fixture)
    tower = load_vision_tower(path, torch.float32)
    s = tower.cfg.image_size
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(tiles, 3, s, s, generator=g) * 2 - 1).to(torch.bfloat16)  # as the processor gives them
    expected = _reference(path, pixels)
    got = tower(pixels)
    assert got.shape == (tiles * tower.cfg.tokens_per_tile, tower.cfg.text_hidden_size) == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    assert expected.std() > 0.1  # a real signal, not a degenerate tower


def test_text_only_checkpoint_is_refused(maverick_tiny, tmp_path):
    from llama4.checkpoint import CheckpointError

    ckpt = tmp_path / "textonly"
    ckpt.mkdir()
    for f in maverick_tiny.iterdir():
        (ckpt / f.name).symlink_to(f)
    (ckpt / "model.safetensors.index.json").unlink()
    index = json.loads((maverick_tiny / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k.startswith("language_model.")}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="vision_model.*no vision tower"):
        load_vision_tower(ckpt)


def test_inconsistent_vision_config_is_explained(maverick_tiny):
    config = json.loads((maverick_tiny / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 64
    with pytest.raises(ValueError, match=r"intermediate_size \(64\) must equal hidden_size / pixel_shuffle_ratio"):
        VisionConfig.from_dict(config)


def test_worst_case_image_runs_through_the_tower(maverick_tiny):
    """What the engine runs at start on a GPU: the largest image preprocessing makes (16 tiles + global)."""
    from transformers import AutoTokenizer

    from serving.engine.multimodal import ImageSupport

    support = ImageSupport.from_pretrained(maverick_tiny, AutoTokenizer.from_pretrained(maverick_tiny))
    assert support.image_cfg.max_tiles() == 17
    assert support.profile_worst_case() == 0  # bytes are measured on CUDA only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a process without a GPU")
def test_tower_falls_back_to_cpu_without_a_gpu(maverick_tiny):
    """An expert-parallel replica asks for the tower on "cuda" but holds no GPU itself (its workers do)."""
    from transformers import AutoTokenizer

    from serving.engine.multimodal import ImageSupport

    support = ImageSupport.from_pretrained(maverick_tiny, AutoTokenizer.from_pretrained(maverick_tiny),
                                           device="cuda")
    assert next(support.tower.parameters()).device.type == "cpu"

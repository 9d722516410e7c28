"""herd's image preprocessing (torch + Pillow) equals transformers' Llama4Processor on the golden fixtures.

The fixtures (tests/fixtures/images, written by make_golden.py with torchvision in a separate venv) hold, per image
and tile size, the grid, the prompt ids "<|image|>" expands to, and the processor's bf16 pixel values.
Tolerance on pixel values: one uint8 level after resizing (2/255 after normalisation, plus one bf16 step), for
machines whose torch takes the float resize path instead of the native uint8 one; on the machine that wrote the
fixtures (AVX-512) every value agrees to the bit, and the test says so when the kernel is the same.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llama4.images import (ImageConfig, PromptExpander, _native_uint8_bilinear, image_prompt, preprocess,
                           prompt_length)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "images"
GOLDEN = json.loads((FIXTURES / "golden.json").read_text())
PIXEL_TOLERANCE = 2 / 255 + 2 ** -7


@pytest.fixture(scope="module")
def golden_pixels() -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(gzip.decompress((FIXTURES / "golden.safetensors.gz").read_bytes()))


@pytest.fixture(scope="module")
def tokenizer(maverick_tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(maverick_tiny)


def test_fixtures_cover_the_issue_cases():
    names = {c["file"] for c in GOLDEN["cases"].values()}
    assert {"1x1.png", "tile56.png", "tile336.png", "wide3000x200.png", "tall200x3000.png", "alpha120x90.png",
            "paletted90x130.gif"} <= names
    assert {c["tile"] for c in GOLDEN["cases"].values()} == {56, 336}
    with Image.open(FIXTURES / "paletted90x130.gif") as gif:
        assert gif.mode == "P" and gif.n_frames == 2 and gif.info.get("transparency") is not None
    with Image.open(FIXTURES / "alpha120x90.png") as png:
        assert png.mode == "RGBA"


@pytest.mark.parametrize("key", sorted(GOLDEN["cases"]))
def test_preprocessing_matches_transformers(key, golden_pixels, tokenizer):
    case = GOLDEN["cases"][key]
    cfg = ImageConfig(tile_size=case["tile"])
    with Image.open(FIXTURES / case["file"]) as img:
        got = preprocess(img, cfg)
    assert list(got.grid) == case["aspect_ratio"]
    assert list(got.pixel_values.shape) == case["pixel_values_shape"] and got.pixel_values.dtype == torch.bfloat16
    expected = golden_pixels[key]
    diff = (got.pixel_values.float() - expected.float()).abs()
    assert diff.max().item() <= PIXEL_TOLERANCE and diff.mean().item() < 1e-3
    if _native_uint8_bilinear():  # the resize kernel the fixtures were made with: equal to the bit
        digest = hashlib.sha256(got.pixel_values.view(torch.int16).numpy().tobytes()).hexdigest()
        assert digest == case["pixel_sha256"]
    ids, patches = PromptExpander(tokenizer, cfg).expand(tokenizer.convert_tokens_to_ids(["<|image|>"]), [got])
    assert ids == case["prompt_ids"]
    assert len(ids) == prompt_length(got.grid, cfg.tokens_per_tile)
    patch_id = tokenizer.convert_tokens_to_ids("<|patch|>")
    assert patches == [[i for i, t in enumerate(ids) if t == patch_id]]
    assert len(patches[0]) == got.num_tiles * cfg.tokens_per_tile


def test_expansion_of_two_images_in_text(tokenizer):
    cfg = ImageConfig(tile_size=56)
    with Image.open(FIXTURES / "grid150x100.png") as a, Image.open(FIXTURES / "1x1.png") as b:
        imgs = [preprocess(a, cfg), preprocess(b, cfg)]
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    ids, patches = PromptExpander(tokenizer, cfg).expand(enc("Compare <|image|> with <|image|> please"), imgs)
    special = lambda grid: tokenizer.convert_tokens_to_ids(image_prompt(grid, 4))  # noqa: E731
    # each placeholder is replaced once (the expansion itself holds an <|image|>, which stays)
    assert ids == enc("Compare ") + special((2, 3)) + enc(" with ") + special((1, 1)) + enc(" please")
    assert [len(p) for p in patches] == [7 * 4, 4]
    assert all(ids[i] == tokenizer.convert_tokens_to_ids("<|patch|>") for p in patches for i in p)
    with pytest.raises(ValueError, match="1 <\\|image\\|> placeholder.*2 image"):
        PromptExpander(tokenizer, cfg).expand(tokenizer.encode("one <|image|>", add_special_tokens=False), imgs)


def test_image_config_from_checkpoint(maverick_tiny):
    cfg = ImageConfig.from_pretrained(maverick_tiny)
    assert (cfg.tile_size, cfg.patch_size, cfg.max_patches, cfg.tokens_per_tile) == (56, 14, 16, 4)
    released = ImageConfig()
    assert released.tokens_per_tile == 144 and released.max_tiles() == 17
    # worst case: 16 grid tiles + the global tile, 17 separators... per grid tile one separator
    assert released.max_image_tokens() == 3 + 17 * 144 + 16

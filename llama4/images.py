"""Llama 4 image preprocessing and prompt expansion, in torch and Pillow only, exactly as transformers'
`Llama4ImageProcessor` and `Llama4Processor` define them (tests/fixtures/images holds their golden outputs).

One image becomes:
- a grid of `tile`-pixel tiles: the canvas (rows x cols tiles, rows * cols <= max_patches) that needs the least
  upscaling, else the least downscaling, smallest area on a tie; the image is resized into it without distortion
  (never upscaled beyond one tile), padded with black at the right and bottom, and cut into tiles row by row;
- plus one global tile (the whole image squeezed to tile x tile) when the grid has more than one tile;
- pixel values rescaled by 1/255 and normalised with mean 0.5, std 0.5, in bfloat16 (as the reference does), so
  `pixel_values` is bf16 [tiles, 3, tile, tile].
In the prompt, each `<|image|>` placeholder becomes `<|image_start|>`, per grid row the tiles' `<|patch|>` runs
joined by `<|tile_x_separator|>` and ended by `<|tile_y_separator|>` (multi-tile only), then `<|image|>`, the
global (or single) tile's `<|patch|>` run and `<|image_end|>`. Patch runs appear in `pixel_values`' tile order, so
the vision encoder's output rows replace the `<|patch|>` positions in order.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llama4.tokenizer import IMAGE, IMAGE_END, IMAGE_START, PATCH, TILE_X, TILE_Y


@dataclass(frozen=True)
class ImageConfig:
    """What preprocessing needs from a checkpoint: tile size, patching, tile limit, normalisation."""

    tile_size: int = 336  # vision_config.image_size == preprocessor size
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    max_patches: int = 16  # most tiles in the grid (the global tile comes on top)
    resize_to_max_canvas: bool = False
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens per tile: patches per tile over the pixel shuffle's downsampling."""
        downsample = int(round(1.0 / self.pixel_shuffle_ratio ** 2))
        return (self.tile_size // self.patch_size) ** 2 // downsample

    def max_tiles(self) -> int:
        return self.max_patches + (1 if self.max_patches > 1 else 0)

    def max_image_tokens(self) -> int:
        """Most prompt tokens one image can expand to (a full grid + global tile, separators included)."""
        return max(prompt_length(grid, self.tokens_per_tile) for grid in supported_grids(self.max_patches))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImageConfig":
        """From a checkpoint folder: config.json's vision_config, preprocessor_config.json, processor_config.json."""
        path = Path(path)
        vision = json.loads((path / "config.json").read_text()).get("vision_config") or {}
        pre = _read_json(path / "preprocessor_config.json")
        proc = _read_json(path / "processor_config.json")
        size = pre.get("size") or {}
        tile = int(size.get("height") or vision.get("image_size") or cls.tile_size)
        if size and size.get("height") != size.get("width"):
            raise ValueError(f"{path}/preprocessor_config.json: size {size} must be square (Llama 4 tiles are)")
        if vision.get("image_size") not in (None, tile):
            raise ValueError(f"{path}: preprocessor size {tile} differs from vision_config.image_size "
                             f"{vision['image_size']}; the vision tower reads tiles of its image_size")
        return cls(
            tile_size=tile,
            patch_size=int(proc.get("patch_size") or vision.get("patch_size") or cls.patch_size),
            pixel_shuffle_ratio=float(vision.get("pixel_shuffle_ratio") or proc.get("pixel_shuffle_ratio")
                                      or cls.pixel_shuffle_ratio),
            max_patches=int(pre.get("max_patches") or cls.max_patches),
            resize_to_max_canvas=bool(pre.get("resize_to_max_canvas", False)),
            rescale_factor=float(pre.get("rescale_factor") or cls.rescale_factor),
            image_mean=tuple(pre.get("image_mean") or cls.image_mean),
            image_std=tuple(pre.get("image_std") or cls.image_std),
        )


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.exists() else {}


@dataclass
class ProcessedImage:
    """One image ready for the vision encoder: its tiles and its grid."""

    pixel_values: torch.Tensor  # bf16 [tiles, 3, tile, tile]: grid tiles row by row, then the global tile
    grid: tuple[int, int]  # (rows, cols) of the grid; (1, 1) means a single tile and no global tile

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


# ---------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------
def supported_grids(max_patches: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with rows * cols <= max_patches, in transformers' order (ties are broken by it)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_patches, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def best_canvas(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    """The canvas (pixels) to fit an image into: least upscaling, else least downscaling, then least area."""
    canvases = torch.tensor([(r * cfg.tile_size, c * cfg.tile_size) for r, c in supported_grids(cfg.max_patches)])
    # float32 tensor arithmetic, as the reference computes it (ties between canvases depend on it)
    scale_h, scale_w = canvases[:, 0] / height, canvases[:, 1] / width
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if cfg.resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    fits = canvases[scales == chosen]
    best = fits[torch.argmin(fits[:, 0] * fits[:, 1])] if len(fits) > 1 else fits[0]
    return int(best[0]), int(best[1])


def _fit_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), target_h), 1), max(target_w, 1)
    return max(target_h, 1), max(min(math.floor(width * scale_h), target_w), 1)


# ---------------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------------
def to_rgb_uint8(image) -> torch.Tensor:
    """uint8 [3, H, W] from a PIL image; transparency is composited onto white (as transformers does)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def _native_uint8_bilinear() -> bool:
    """torchvision resizes uint8 natively (no float round trip) only where torch has the vectorised kernel."""
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_uint8(img_3HW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 image, as torchvision's `resize` computes it on CPU."""
    if (height, width) == tuple(img_3HW.shape[-2:]):
        return img_3HW
    x = img_3HW[None]
    if _native_uint8_bilinear():
        return F.interpolate(x, size=[height, width], mode="bilinear", align_corners=False, antialias=True)[0]
    y = F.interpolate(x.float(), size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    return y.round_().to(torch.uint8)[0]


def _rescale_normalize(img: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """In bfloat16, step by step as the reference does (so the values agree to the bit)."""
    x = img.to(torch.bfloat16) * cfg.rescale_factor
    mean = torch.tensor(cfg.image_mean, dtype=torch.bfloat16).view(-1, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.bfloat16).view(-1, 1, 1)
    return x.sub(mean).div_(std)


def preprocess(image, cfg: ImageConfig) -> ProcessedImage:
    """A PIL image -> tiles (bf16) and grid, as `Llama4ImageProcessor` makes them."""
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[-2:]
    canvas_h, canvas_w = best_canvas(h, w, cfg)
    if cfg.resize_to_max_canvas:
        limit_h, limit_w = canvas_h, canvas_w
    else:  # never upscale past one tile: small images are padded rather than blown up
        limit_h = min(max(h, cfg.tile_size), canvas_h)
        limit_w = min(max(w, cfg.tile_size), canvas_w)
    new_h, new_w = _fit_without_distortion(h, w, limit_h, limit_w)
    resized = resize_uint8(rgb, new_h, new_w)
    padded = F.pad(resized, (0, canvas_w - new_w, 0, canvas_h - new_h), value=0)
    rows, cols = canvas_h // cfg.tile_size, canvas_w // cfg.tile_size
    t = cfg.tile_size
    tiles = _rescale_normalize(padded, cfg).view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(-1, 3, t, t)
    if rows * cols > 1:
        whole = _rescale_normalize(resize_uint8(rgb, t, t), cfg)
        tiles = torch.cat([tiles, whole[None]])
    return ProcessedImage(tiles.contiguous(), (rows, cols))


# ---------------------------------------------------------------------------------------------------------
# The prompt
# ---------------------------------------------------------------------------------------------------------
def image_prompt(grid: tuple[int, int], tokens_per_tile: int) -> list[str]:
    """The special tokens one image expands to, in order (`Llama4Processor._prompt_split_image`)."""
    rows, cols = grid
    out = [IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += [PATCH] * tokens_per_tile
                if x < cols - 1:
                    out.append(TILE_X)
            out.append(TILE_Y)
    out.append(IMAGE)
    out += [PATCH] * tokens_per_tile
    out.append(IMAGE_END)
    return out


def prompt_length(grid: tuple[int, int], tokens_per_tile: int) -> int:
    """Tokens one image takes in the prompt: 3 markers, the patch runs, one separator per grid tile (multi-tile)."""
    n = grid[0] * grid[1]
    return 3 + tokens_per_tile + (n * (tokens_per_tile + 1) if n > 1 else 0)


class PromptExpander:
    """Replaces each `<|image|>` placeholder id in a prompt by its image's expansion; says where the patches are."""

    def __init__(self, tokenizer, cfg: ImageConfig):
        self.cfg = cfg
        ids = tokenizer.convert_tokens_to_ids([IMAGE, IMAGE_START, IMAGE_END, PATCH, TILE_X, TILE_Y])
        self.ids = dict(zip([IMAGE, IMAGE_START, IMAGE_END, PATCH, TILE_X, TILE_Y], ids))
        self.image_id, self.patch_id = self.ids[IMAGE], self.ids[PATCH]

    def expand(self, prompt_ids: list[int], images: list[ProcessedImage]) -> tuple[list[int], list[list[int]]]:
        """(expanded ids, per image the prompt positions of its `<|patch|>` tokens, in tile order)."""
        places = [i for i, t in enumerate(prompt_ids) if t == self.image_id]
        if len(places) != len(images):
            raise ValueError(f"the prompt has {len(places)} {IMAGE} placeholder(s) but {len(images)} image(s) were "
                             f"given; put one {IMAGE} where each image goes (chat image parts render it)")
        out: list[int] = []
        patches: list[list[int]] = []
        prev = 0
        for place, img in zip(places, images):
            out += prompt_ids[prev:place]
            start = len(out)
            out += [self.ids[t] for t in image_prompt(img.grid, self.cfg.tokens_per_tile)]
            patches.append([start + j for j, t in enumerate(out[start:]) if t == self.patch_id])
            prev = place + 1
        out += prompt_ids[prev:]
        return out, patches

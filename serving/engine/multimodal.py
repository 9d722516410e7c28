"""Images in the engine: prompt dicts and chat image parts in, `<|patch|>` embeddings fused into prefill pieces.

A request with images carries them from `make_request` on (`Request.images`): each image's tiles (preprocessed
with llama4/images.py), the prompt positions of its `<|patch|>` tokens after the `<|image|>` placeholder was
expanded, and, once computed, its embeddings. The vision tower (serving/vision.py) runs in the engine's process
once per image, when the first prefill piece that covers one of the image's patches is scheduled, so a prompt
with many images spreads the encoder's work over its prefill steps (each step's pieces are bounded by
`max_num_batched_tokens`, image tokens included). The embeddings stay with the request: later pieces, and a
recomputation after the executor forgot the sequence, reuse them. Each piece carries the rows it needs as
`SeqChunk.mm_embeds` (offsets inside the piece, [R, D]); the executor writes them over the token embeddings
(`serving.model.Batch.mm_rows_R`) before the first decoder layer.

Prompts, as vLLM takes them:
  {"prompt": "... <|image|> ...", "multi_modal_data": {"image": PIL.Image | [PIL.Image, ...]}}
  {"prompt_token_ids": [... <|image|> id ...], "multi_modal_data": {...}}
one `<|image|>` placeholder per image, in order (the chat template writes one for each image part).
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llama4.images import ImageConfig, ProcessedImage, PromptExpander, preprocess

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES_PER_REQUEST = 8
IMAGE_PART_TYPES = ("image", "image_url", "image_pil")


@dataclass(eq=False)
class RequestImage:
    """One image of a request: its tiles, where its patches sit in the prompt, and its embeddings once made."""

    tiles: ProcessedImage
    patch_positions: list[int]  # prompt positions of its <|patch|> tokens, in the encoder's output order
    embeds_RD: torch.Tensor | None = None  # [len(patch_positions), D] after the vision tower ran

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 of the pixel values: what a prefix-cache key must include for this image (made once, by
        `ImageSupport.expand`, in the thread that preprocesses)."""
        return hashlib.sha256(self.tiles.pixel_values.view(torch.int16).numpy().tobytes()).hexdigest()


class ImageSupport:
    """A checkpoint's image path in the engine: preprocessing config, prompt expansion and the vision tower."""

    def __init__(self, tokenizer, image_cfg: ImageConfig, tower,
                 max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST):
        self.image_cfg = image_cfg
        self.expander = PromptExpander(tokenizer, image_cfg)
        self.tower = tower
        self.max_images_per_request = max_images_per_request
        self.images_encoded = 0  # vision tower runs since start (one per image)

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", reader=None) -> "ImageSupport | None":
        """For a checkpoint with a vision tower; None for a text-only one. `reader` (serving.loader.open_reader)
        reads the weights where the engine's config says they are; `path` holds config and processor files."""
        from serving.vision import has_vision_weights, load_vision_tower

        if not has_vision_weights(path):
            return None
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            # An expert-parallel replica process may hold no GPU (its workers do): the tower runs on its CPU.
            log.warning("no CUDA device in the engine's process: the vision tower runs on the CPU")
            device = "cpu"
        support = cls(tokenizer, ImageConfig.from_pretrained(path), load_vision_tower(path, dtype, device, reader))
        if torch.device(device).type == "cuda":  # a device short of memory fails now, not under load
            support.profile_worst_case()
        return support

    def profile_worst_case(self) -> int:
        """Run the tower once on the largest image preprocessing can make (a full grid + the global tile) and
        return the peak bytes it added on a CUDA device (0 elsewhere); the encoder runs one image at a time, so
        this bounds its activations whatever the images per request."""
        cfg = self.image_cfg
        w = next(self.tower.parameters())
        tiles = torch.zeros(cfg.max_tiles(), 3, cfg.tile_size, cfg.tile_size, dtype=torch.bfloat16, device=w.device)
        cuda = w.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(w.device)
            base = torch.cuda.memory_allocated(w.device)
            torch.cuda.reset_peak_memory_stats(w.device)
        out = self.tower(tiles)
        assert out.shape[0] == cfg.max_tiles() * cfg.tokens_per_tile
        peak = torch.cuda.max_memory_allocated(w.device) - base if cuda else 0
        log.info("vision tower worst case: %d tiles, %.1f MiB of activations", cfg.max_tiles(), peak / 2**20)
        return peak

    # ---- requests ----------------------------------------------------------------------------------
    def expand(self, ids: list[int], images: list, max_images: int | None = None
               ) -> tuple[list[int], list[RequestImage]]:
        """Preprocess PIL images and expand their placeholders in `ids`."""
        limit = self.max_images_per_request if max_images is None else max_images
        if len(images) > limit:
            raise ValueError(f"{len(images)} images in one request; at most {limit} are allowed "
                             "(max_images_per_request)")
        tiles = [preprocess(_check_image(img, i), self.image_cfg) for i, img in enumerate(images)]
        expanded, positions = self.expander.expand(ids, tiles)
        out = [RequestImage(t, p) for t, p in zip(tiles, positions)]
        for img in out:
            img.content_hash  # noqa: B018  (hashed here, off the caller's event loop, not at admission)
        return expanded, out

    def chunk_embeds(self, images: list[RequestImage], start: int, length: int):
        """(offsets inside the piece, embeddings [R, D]) for the patches in [start, start + length), or None."""
        offsets, rows = [], []
        for img in images:
            pos = img.patch_positions
            if not pos or pos[-1] < start or pos[0] >= start + length:
                continue
            sel = [j for j, p in enumerate(pos) if start <= p < start + length]
            if not sel:  # a piece of separators between the image's patch runs
                continue
            if img.embeds_RD is None:
                img.embeds_RD = self.tower(img.tiles.pixel_values)
                self.images_encoded += 1
            offsets += [pos[j] - start for j in sel]
            rows.append(img.embeds_RD[sel[0]: sel[-1] + 1])  # a piece covers a contiguous run of patches
        if not offsets:
            return None
        return offsets, torch.cat(rows)


def _check_image(img, index: int):
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise ValueError(f"multi_modal_data image {index} is a {type(img).__name__}; give PIL.Image.Image objects")
    return img


def parse_prompt(engine, prompt: dict) -> tuple[str | None, list[int], list[RequestImage] | None]:
    """A vLLM-style prompt dict -> (text, expanded ids, images)."""
    unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
    if unknown:
        raise ValueError(f"prompt dict has unknown key(s) {sorted(unknown)}; use 'prompt' or 'prompt_token_ids', "
                         "and 'multi_modal_data'")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError("a prompt dict needs exactly one of 'prompt' (text) or 'prompt_token_ids'")
    text = prompt.get("prompt")
    ids = engine.tokenizer.encode(text) if text is not None else [int(t) for t in prompt["prompt_token_ids"]]
    data = prompt.get("multi_modal_data") or {}
    if set(data) - {"image"}:
        raise ValueError(f"multi_modal_data has {sorted(set(data) - {'image'})}; Llama 4 takes only 'image'")
    images = data.get("image")
    if images is None:
        return text, ids, None
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if images and all(isinstance(i, RequestImage) for i in images):
        return text, ids, images  # prepared by `ImageSupport.expand` (the HTTP replica): ids already expanded
    support = engine.image_support
    if support is None:
        raise ValueError("this checkpoint has no vision tower (no vision_model.* weights); it cannot take images")
    ids, request_images = support.expand(ids, images)
    return text, ids, request_images


def chat_prompt(engine, messages: list[dict]) -> dict:
    """Chat messages whose content may hold image parts -> a prompt dict for `make_request`.

    Image parts: {"type": "image", "image": PIL.Image}, {"type": "image_pil", "image_pil": PIL.Image}, or OpenAI's
    {"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}} (data: URLs only; the HTTP layer
    fetches and checks anything else). Each becomes the template's {"type": "image"}, which renders `<|image|>`.
    """
    from serving.image_io import decode_data_url

    images, rendered = [], []
    for m, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, list):
            rendered.append(msg)
            continue
        parts = []
        for p, part in enumerate(content):
            kind = part.get("type")
            if kind not in IMAGE_PART_TYPES:
                parts.append(part)
                continue
            if kind == "image_url":
                url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                img = decode_data_url(url, where=f"messages[{m}].content[{p}]")
            else:
                img = part.get(kind)
            images.append(img)
            parts.append({"type": "image"})
        rendered.append({**msg, "content": parts})
    ids = engine.apply_chat_template(rendered)
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}} if images else {"prompt_token_ids": ids}


def attach_image_embeds(batch, chunks) -> None:
    """Set `batch.mm_rows_R` / `mm_embeds_RD` from the chunks' `mm_embeds` (rows in the flat batch)."""
    rows, embeds = [], []
    for span, chunk in zip(batch.spans, chunks):
        if chunk.mm_embeds is not None:
            offsets, e = chunk.mm_embeds
            rows += [span.offset + o for o in offsets]
            embeds.append(e)
    if rows:
        device = batch.tokens_T.device
        batch.mm_rows_R = torch.tensor(rows, dtype=torch.long, device=device)
        batch.mm_embeds_RD = torch.cat(embeds).to(device)

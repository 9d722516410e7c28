"""Llama 4 checkpoints in the released Hugging Face layout: write small ones, read any (safetensors only).

Writing: `create_checkpoint(preset, out_dir, seed)` produces exactly the files of a released Llama 4 Instruct
repository (config.json for `Llama4ForConditionalGeneration`, sharded `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json`, tokenizer files with the chat template, generation_config.json, and for images
preprocessor_config.json, processor_config.json and chat_template.json), with weights drawn from a seeded
generator per tensor: same preset and seed, same bytes. The small presets' vision tower runs in transformers
(`get_image_features` -> `multi_modal_projector`), and the tokenizer has `<|image|>` and `<|patch|>` at their
released offsets (200090 and 200092 in the real vocabulary; config.json's `image_token_index` is `<|patch|>`).

Reading: `CheckpointReader` resolves tensor names through the index for both the released multimodal layout
(`language_model.model.layers.N...`) and the text-only `Llama4ForCausalLM` layout (`model.layers.N...`), and
reads a slice of experts of a fused expert tensor without reading the rest.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Iterator

import torch

from common.errors import CheckpointError
from llama4.presets import Preset, get_preset
from llama4.tokenizer import (EOM, EOS_TEXT, EOT, IMAGE, IMAGE_END, IMAGE_START, PAD, PATCH, BOS,
                              llama4_chat_template, train_tokenizer, write_tokenizer_files)

INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def hf_config(preset: Preset, special: dict[str, int], vocab_size: int) -> dict:
    """config.json content, in the layout of the released Llama 4 Instruct repositories."""
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": special[BOS],
        "eos_token_id": [special[EOS_TEXT], special[EOM], special[EOT]],
        "for_llm_compressor": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "llama4_text",
        "no_rope_layers": [],
        "output_router_logits": False,
        "pad_token_id": special[PAD],
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **preset.text,
        "vocab_size": vocab_size,
    }
    vision = {
        "attention_dropout": 0.0,
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "model_type": "llama4_vision_model",
        "multi_modal_projector_bias": False,
        "norm_eps": 1e-5,
        "num_channels": 3,
        "projector_dropout": 0.0,
        "rope_theta": 10000,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        **preset.vision,
    }
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "boi_token_index": special[IMAGE_START],
        "eoi_token_index": special[IMAGE_END],
        "image_token_index": special[PATCH],  # the <|patch|> placeholders that image features replace
        "model_type": "llama4",
        "text_config": dict(sorted(text.items())),
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0.dev0",
        "vision_config": dict(sorted(vision.items())),
    }


def processor_files(preset: Preset) -> dict[str, dict]:
    """preprocessor_config.json, processor_config.json and chat_template.json, as the released repositories carry
    them; the tile size is the vision tower's `image_size` (336 released)."""
    v = preset.vision
    preprocessor = {
        "crop_size": None,
        "data_format": "channels_first",
        "default_to_square": True,
        "device": None,
        "do_center_crop": None,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Llama4ImageProcessorFast",
        "image_std": [0.5, 0.5, 0.5],
        "input_data_format": None,
        "max_patches": 16,
        "processor_class": "Llama4Processor",
        "resample": 2,
        "rescale_factor": 1 / 255,
        "resize_to_max_canvas": False,
        "return_tensors": None,
        "size": {"height": v["image_size"], "width": v["image_size"]},
    }
    processor = {"fake_image_token": IMAGE, "image_token": IMAGE, "patch_size": v["patch_size"],
                 "pixel_shuffle_ratio": v["pixel_shuffle_ratio"], "processor_class": "Llama4Processor"}
    return {"preprocessor_config.json": preprocessor, "processor_config.json": processor,
            "chat_template.json": {"chat_template": llama4_chat_template()}}


def text_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the text model's tensors, as released (`language_model.` prefix)."""
    t = config["text_config"]
    h, hd, n_layers = t["hidden_size"], t["head_dim"], t["num_hidden_layers"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    step = t.get("interleave_moe_layer_step", 1)
    moe = set(t.get("moe_layers") or range(step - 1, n_layers, step))
    E, I, I_mlp = t["num_local_experts"], t["intermediate_size"], t["intermediate_size_mlp"]
    p = "language_model.model"
    shapes: dict[str, tuple[int, ...]] = {f"{p}.embed_tokens.weight": (t["vocab_size"], h)}
    for i in range(n_layers):
        L = f"{p}.layers.{i}"
        shapes[f"{L}.input_layernorm.weight"] = (h,)
        shapes[f"{L}.post_attention_layernorm.weight"] = (h,)
        shapes[f"{L}.self_attn.q_proj.weight"] = (q, h)
        shapes[f"{L}.self_attn.k_proj.weight"] = (kv, h)
        shapes[f"{L}.self_attn.v_proj.weight"] = (kv, h)
        shapes[f"{L}.self_attn.o_proj.weight"] = (h, q)
        if i in moe:
            shapes[f"{L}.feed_forward.router.weight"] = (E, h)
            shapes[f"{L}.feed_forward.experts.gate_up_proj"] = (E, h, 2 * I)  # [in, out] layout, gate first
            shapes[f"{L}.feed_forward.experts.down_proj"] = (E, I, h)
            for name, shp in (("gate_proj", (I, h)), ("up_proj", (I, h)), ("down_proj", (h, I))):
                shapes[f"{L}.feed_forward.shared_expert.{name}.weight"] = shp
        else:
            for name, shp in (("gate_proj", (I_mlp, h)), ("up_proj", (I_mlp, h)), ("down_proj", (h, I_mlp))):
                shapes[f"{L}.feed_forward.{name}.weight"] = shp
    shapes[f"{p}.norm.weight"] = (h,)
    shapes["language_model.lm_head.weight"] = (t["vocab_size"], h)
    return shapes


def vision_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the vision encoder and projector, taken from transformers' own module (meta device)."""
    from transformers import Llama4Config
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    cfg = Llama4Config(text_config=config["text_config"], vision_config=config["vision_config"])
    with torch.device("meta"):
        vision = Llama4VisionModel(cfg.vision_config)
        projector = Llama4MultiModalProjector(cfg)
    shapes = {f"vision_model.{k}": tuple(v.shape) for k, v in vision.state_dict().items()}
    shapes.update({f"multi_modal_projector.{k}": tuple(v.shape) for k, v in projector.state_dict().items()})
    return shapes


def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One tensor's initial values, from a generator seeded by (seed, name): independent of write order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    if len(shape) == 1:  # norm weights and biases: near one, so a missing norm weight shows in tests
        base = 1.0 if "norm" in name or name.endswith("weight") else 0.0
        return base + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("embed_tokens.weight") or "positional_embedding" in name:
        return torch.randn(shape, generator=g)
    # Fan-in scaled so activations stay O(1) through the stack and logits are well separated.
    fan_in = shape[-2] if name.endswith(("gate_up_proj", "experts.down_proj")) else math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def create_checkpoint(preset: str | Preset, out_dir: str | Path, seed: int = 0, overwrite: bool = False,
                      num_shards: int | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a checkpoint for a preset in the released Hugging Face Llama 4 layout; returns its folder."""
    from safetensors.torch import save_file

    preset = get_preset(preset) if isinstance(preset, str) else preset
    if not preset.materialise:
        raise ValueError(f"preset {preset.name!r} is for planning only (hundreds of GB); use a -tiny or -bench preset")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose another folder or pass overwrite=True (--force)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(preset.bpe_vocab_size)
    vocab_size = tok.get_vocab_size()
    special = write_tokenizer_files(tok, out, model_max_length=preset.text.get("max_position_embeddings", 4096))
    config = hf_config(preset, special, vocab_size)
    shapes = {**text_tensor_shapes(config), **vision_tensor_shapes(config)}

    total = sum(math.prod(s) for s in shapes.values()) * torch.finfo(dtype).bits // 8
    n = num_shards or max(3, math.ceil(total / 2**31))
    target = total / n
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if size >= target * len(shards) and len(shards) < n:
            shards.append({})
        t = _init_tensor(name, shape, seed).to(dtype)
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    weight_map = {}
    for k, tensors in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": special[BOS],
        "do_sample": True,
        "eos_token_id": [special[EOS_TEXT], special[EOM], special[EOT]],
        "pad_token_id": special[PAD],
        "temperature": 0.6,
        "top_p": 0.9,
        "transformers_version": "4.51.0.dev0",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name, content in processor_files(preset).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def ensure_checkpoint(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """The preset's checkpoint at `out_dir`, written only if no complete one is there (benchmarks, the demo).

    Complete means the index exists: it is written after the weight shards, so a folder left half-written by an
    interrupted run is written again.
    """
    out = Path(out_dir)
    if not (out / INDEX_FILE).exists():
        print(f"creating {preset} checkpoint in {out} ...", flush=True)
        create_checkpoint(preset, out, seed=seed, overwrite=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
class CheckpointReader:
    """Reads tensors of a Llama 4 checkpoint folder by text-model name, from safetensors files only.

    Text-model names are given without prefix (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`);
    the reader finds them under `language_model.` (released multimodal layout) or as-is (text-only layout).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist")
        self.weight_map = self._weight_map()
        self.prefix = "language_model." if any(k.startswith("language_model.") for k in self.weight_map) else ""
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            return json.loads(index.read_text())["weight_map"]
        single = self.path / "model.safetensors"
        if single.exists():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                return {k: single.name for k in f.keys()}
        pickled = sorted(p.name for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{self.path} holds only pickled weights ({', '.join(pickled[:3])}); herd loads safetensors only, "
                "because unpickling can run arbitrary code. Convert them first, e.g. load with transformers and "
                "save_pretrained(..., safe_serialization=True)."
            )
        raise CheckpointError(f"{self.path} has no {INDEX_FILE} or model.safetensors: not a Hugging Face checkpoint")

    def full_name(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self.full_name(name) in self.weight_map

    def _handle(self, fname: str):
        from safetensors import safe_open

        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.path / fname), framework="pt")
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        """A whole tensor by text-model name."""
        full = self.full_name(name)
        if full not in self.weight_map:
            raise CheckpointError(f"tensor {full!r} is missing from {self.path}")
        return self._handle(self.weight_map[full]).get_tensor(full)

    def get_raw(self, full_name: str) -> torch.Tensor:
        """A tensor by its name in the files (e.g. `vision_model.*`, which has no text-model name)."""
        if full_name not in self.weight_map:
            raise CheckpointError(f"tensor {full_name!r} is missing from {self.path}")
        return self._handle(self.weight_map[full_name]).get_tensor(full_name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its file's header (no data read)."""
        full = self.full_name(name)
        if full not in self.weight_map:
            raise CheckpointError(f"tensor {full!r} is missing from {self.path}")
        return tuple(self._handle(self.weight_map[full]).get_slice(full).get_shape())

    def get_rows(self, name: str, index: list[int] | range) -> torch.Tensor:
        """Rows `index` of the first dimension (e.g. some experts of a fused expert tensor), reading only those."""
        full = self.full_name(name)
        sl = self._handle(self.weight_map[full]).get_slice(full)
        idx = list(index)
        if idx and idx == list(range(idx[0], idx[-1] + 1)):
            return sl[idx[0]: idx[-1] + 1]
        return torch.stack([sl[i: i + 1][0] for i in idx]) if idx else sl[0:0]

    def names(self) -> Iterator[str]:
        """Text-model tensor names (vision tensors excluded)."""
        for full in self.weight_map:
            if self.prefix and not full.startswith(self.prefix):
                continue
            yield full[len(self.prefix):]

    def close(self) -> None:
        self._handles.clear()

"""Checkpoint folder -> `serving.model.Transformer`, through `llama4.checkpoint.CheckpointReader` (safetensors only).

Works for the released `Llama4ForConditionalGeneration` layout (`language_model.` prefix; vision weights are not
read) and the text-only `Llama4ForCausalLM` layout, in bf16 or fp32. The model is built on the meta device and
materialised once on the target device, so loading needs one copy of the weights in memory. A caller may ask for
only some experts of each MoE layer (`expert_ids`); the other experts' bytes are never read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from llama4.checkpoint import CheckpointError, CheckpointReader
from llama4.config import TextConfig
from serving.model import RoutedExperts, Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a user's name for it; the error lists the accepted names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}") from None


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               expert_ids: Callable[[int], list[int]] | None = None,
               cfg: TextConfig | None = None, lora_adapter: str | Path | None = None,
               optimize: bool = True) -> Transformer:
    """Build the text model from a checkpoint folder.

    expert_ids: layer index -> the logical experts to hold in that MoE layer (default: all of them).
    lora_adapter: a PEFT LoRA adapter folder, merged into the weights as they load (serving/lora.py).
    optimize: re-lay the weights for serving (`Transformer.optimize_for_inference`: same names, shapes, values).
    """
    path = Path(path)
    cfg = cfg or TextConfig.from_pretrained(path)
    torch_dtype = resolve_dtype(dtype)
    reader = CheckpointReader(path)
    if lora_adapter is not None:
        from serving.lora import LoraAdapter, MergedReader

        reader = MergedReader(reader, LoraAdapter.load(lora_adapter))
    with torch.device("meta"):
        model = Transformer(cfg)
        if expert_ids is not None:
            for i, layer in enumerate(model.layers):
                if layer.is_moe:
                    layer.feed_forward.experts = RoutedExperts(cfg, expert_ids(i))
    model = model.to(torch_dtype).to_empty(device=device)
    try:
        _load_weights(model, reader, cfg)
        if lora_adapter is not None:
            reader.check_all_merged()
    finally:
        reader.close()
    model.reset_buffers()
    if optimize:
        model.optimize_for_inference()
    return model.eval().requires_grad_(False)


def checkpoint_name(param: str) -> str:
    """The checkpoint (and transformers `Llama4ForCausalLM`) name of a `Transformer` parameter."""
    return param if param.startswith("lm_head.") else "model." + param


def _load_weights(model: Transformer, reader: CheckpointReader, cfg: TextConfig) -> None:
    experts = {f"layers.{i}.feed_forward.experts": layer.feed_forward.experts
               for i, layer in enumerate(model.layers) if layer.is_moe}
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        ckpt = checkpoint_name(name)
        if owner in experts:
            tensor = reader.get_rows(ckpt, experts[owner].expert_ids)
        elif name == "lm_head.weight" and not reader.has(ckpt) and cfg.tie_word_embeddings:
            tensor = reader.get("model.embed_tokens.weight")
        else:
            if not reader.has(ckpt):
                raise CheckpointError(f"tensor {reader.full_name(ckpt)!r} is missing from {reader.path}; "
                                      "is config.json the one that came with these weights?")
            tensor = reader.get(ckpt)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {reader.full_name(ckpt)!r} has shape {tuple(tensor.shape)} but "
                                  f"config.json implies {tuple(param.shape)}; config and weights disagree")
        with torch.no_grad():
            param.copy_(tensor)


def load_routed_experts(path: str | Path, layer: int, expert_ids: list[int], dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", cfg: TextConfig | None = None,
                        reader: CheckpointReader | None = None) -> RoutedExperts:
    """Only the given experts of one MoE layer, read by safetensors slices (for expert-parallel workers)."""
    cfg = cfg or TextConfig.from_pretrained(path)
    if not cfg.is_moe_layer(layer):
        raise ValueError(f"layer {layer} is not an MoE layer (MoE layers: {list(cfg.moe_layers)})")
    own = reader is None
    reader = reader or CheckpointReader(path)
    try:
        with torch.device("meta"):
            module = RoutedExperts(cfg, expert_ids)
        module = module.to(resolve_dtype(dtype)).to_empty(device=device)
        prefix = f"model.layers.{layer}.feed_forward.experts."
        with torch.no_grad():
            module.gate_up_proj.copy_(reader.get_rows(prefix + "gate_up_proj", expert_ids))
            module.down_proj.copy_(reader.get_rows(prefix + "down_proj", expert_ids))
        module.local_of_global = torch.empty(cfg.num_local_experts, dtype=torch.long, device=device)
        module.reset_buffers()
        return module.requires_grad_(False)
    finally:
        if own:
            reader.close()

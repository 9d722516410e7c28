"""The one shard loader: "these experts, this tensor-parallel share, from this source" -> `serving.model.Transformer`.

The single-process engine and every expert-parallel worker call `load_shard`; they differ only in what they ask
for. Sources are `WeightReader`s: a checkpoint folder (`llama4.checkpoint.CheckpointReader`), `s3://` byte ranges
(`serving.expert_parallel.s3.S3Checkpoint`), and either of them wrapped by `serving.lora.MergedReader`, which
merges a LoRA adapter into each tensor as it is read. `open_reader` picks the right one.

Works for the released `Llama4ForConditionalGeneration` layout (`language_model.` prefix; vision weights are not
read) and the text-only `Llama4ForCausalLM` layout, in bf16 or fp32. The model is built on the meta device with
only the requested experts (and, when a `shard` callback is given, only this rank's tensor-parallel share; see
serving/expert_parallel/tensor_parallel.py, which tags each sharded tensor with the rows or columns it keeps),
then materialised once on the target device and filled tensor by tensor: a process never holds more than its
share plus one tensor, and experts it does not hold are never read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from llama4.checkpoint import CheckpointError
from llama4.config import TextConfig
from serving.model import RoutedExperts, Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class WeightReader(Protocol):
    """Tensors of one checkpoint by text-model name (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`).

    `get_rows` reads only rows `index` of the first dimension: some experts of a fused expert tensor, or a
    tensor-parallel block. Ids may repeat (a second copy of an expert for load balancing) and come back in the
    order given. Reads are per tensor and per row, so a reader can equally hand out one expert's LoRA factors
    (serving/lora.py keeps them per expert row) for adapters applied per request instead of merged.
    """

    path: object

    def has(self, name: str) -> bool: ...
    def full_name(self, name: str) -> str: ...
    def get(self, name: str) -> torch.Tensor: ...
    def get_rows(self, name: str, index: list[int] | range) -> torch.Tensor: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def names(self) -> Iterator[str]: ...
    def close(self) -> None: ...


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a user's name for it; the error lists the accepted names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}") from None


def open_reader(source: str | Path, *, lora_adapter: str | Path | None = None, s3_endpoint_url: str | None = None,
                cache_dir: str | Path | None = None) -> WeightReader:
    """The reader for a checkpoint folder or `s3://bucket/prefix` (byte ranges, cached in `cache_dir`), merging
    `lora_adapter` into every tensor it returns when one is given."""
    source = str(source)
    if source.startswith("s3://"):
        from serving.expert_parallel.s3 import S3Checkpoint

        if cache_dir is None:
            raise ValueError(f"reading {source} needs a node-local cache_dir for the fetched byte ranges")
        reader = S3Checkpoint(source, cache_dir, endpoint_url=s3_endpoint_url)
    else:
        from llama4.checkpoint import CheckpointReader

        reader = CheckpointReader(source)
    if lora_adapter is None:
        return reader
    from serving.lora import LoraAdapter, MergedReader

    return MergedReader(reader, LoraAdapter.load(lora_adapter))


def load_shard(cfg: TextConfig, reader: WeightReader, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", expert_ids: Callable[[int], list[int]] | None = None,
               shard: Callable[[Transformer], None] | None = None, optimize: bool = True) -> Transformer:
    """Build the text model holding only what is asked for, and fill it from `reader` (which the caller closes).

    expert_ids: MoE layer index -> the logical experts to hold there, in slot order (default: all of them).
    shard: applied to the model on the meta device before it is materialised, to cut it to this rank's share
        (tensor parallelism); it tags each cut parameter's owner with `tp_shard = (dim, start, stop)`.
    optimize: re-lay the weights for serving (`Transformer.optimize_for_inference`: same names, shapes, values).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
        if expert_ids is not None:
            for i, layer in enumerate(model.layers):
                if layer.is_moe:
                    layer.feed_forward.experts = RoutedExperts(cfg, expert_ids(i))
        if shard is not None:
            shard(model)
    model = model.to(resolve_dtype(dtype)).to_empty(device=device)
    fill_parameters(model, reader, cfg)
    if hasattr(reader, "check_all_merged"):
        reader.check_all_merged()
    model.reset_buffers()
    if optimize:
        model.optimize_for_inference()
    return model.eval().requires_grad_(False)


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               expert_ids: Callable[[int], list[int]] | None = None,
               cfg: TextConfig | None = None, lora_adapter: str | Path | None = None,
               optimize: bool = True) -> Transformer:
    """The whole text model (or some experts of it) from a checkpoint folder, in this process."""
    cfg = cfg or TextConfig.from_pretrained(path)
    reader = open_reader(path, lora_adapter=lora_adapter)
    try:
        return load_shard(cfg, reader, dtype=dtype, device=device, expert_ids=expert_ids, optimize=optimize)
    finally:
        reader.close()


def checkpoint_name(param: str) -> str:
    """The checkpoint (and transformers `Llama4ForCausalLM`) name of a `Transformer` parameter."""
    return param if param.startswith("lm_head.") else "model." + param


def fill_parameters(model: nn.Module, reader: WeightReader, cfg: TextConfig) -> None:
    """Copy every parameter's share in: held experts' rows, a tensor-parallel block's rows (or columns), the rest
    whole. Row shards are read as row ranges (from S3: one byte range each); column shards read the tensor, then
    slice it."""
    for name, param in model.named_parameters():
        owner_name, _, _ = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        ckpt = checkpoint_name(name)
        if ckpt == "lm_head.weight" and not reader.has(ckpt) and cfg.tie_word_embeddings:
            ckpt = "model.embed_tokens.weight"
        if not reader.has(ckpt):
            raise CheckpointError(f"tensor {reader.full_name(ckpt)!r} is missing from {reader.path}; "
                                  "is config.json the one that came with these weights?")
        cut = getattr(owner, "tp_shard", None)  # (dim, start, stop) of the checkpoint tensor
        if isinstance(owner, RoutedExperts):
            tensor = reader.get_rows(ckpt, owner.expert_ids)
        elif cut is not None and cut[0] == 0:
            tensor = reader.get_rows(ckpt, range(cut[1], cut[2]))
        elif cut is not None:
            tensor = reader.get(ckpt)[:, cut[1]:cut[2]]
        else:
            tensor = reader.get(ckpt)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {reader.full_name(ckpt)!r} has shape {tuple(tensor.shape)} but "
                                  f"config.json implies {tuple(param.shape)} for this process's share; config and "
                                  "weights disagree")
        with torch.no_grad():
            param.copy_(tensor)


def load_routed_experts(path: str | Path, layer: int, expert_ids: list[int], dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", cfg: TextConfig | None = None) -> RoutedExperts:
    """Only the given experts of one MoE layer, read by safetensors slices (tests and tools)."""
    cfg = cfg or TextConfig.from_pretrained(path)
    if not cfg.is_moe_layer(layer):
        raise ValueError(f"layer {layer} is not an MoE layer (MoE layers: {list(cfg.moe_layers)})")
    reader = open_reader(path)
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
        reader.close()

"""One engine configuration (vLLM's `VllmConfig`): what to load, where it runs, how its cache, scheduler and
parallel layout are sized. Built once per engine, validated once, handed down; nothing below re-reads
config.json or re-checks the layout.

    EngineConfig
      model      ModelConfig      checkpoint folder, its parsed TextConfig and raw config.json, dtype, device,
                                  where weights are read (folder or s3://), LoRA adapter merged on load
      cache      CacheConfig      max_model_len, KV-cache memory budget
      scheduler  SchedulerConfig  max_num_seqs, max_num_batched_tokens
      parallel   ParallelConfig   expert/tensor-parallel sizes, nodes, placement, workers' resources

`LLMEngine.from_pretrained(path, **kwargs)` calls `EngineConfig.from_kwargs`; an unknown keyword, or one that
the chosen layout would not use, is an error naming it, never silently dropped.

The parallel layout's rules live here alone (`check_layout`): the engine, the Serve arguments and the cluster
planner all call it, each naming the fields in its own words (`expert_parallel_size` for the engine,
`serving.nodes_per_replica x node_groups[i].gpus_per_node` in a cluster file), so one bad layout gets one
rule's message everywhere.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import UserError
from llama4.config import TextConfig

DEFAULT_MAX_MODEL_LEN = 8192
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class EngineConfigError(UserError, ValueError):
    """A setting the engine cannot run with; the message names the setting, its value and the fix."""


# ---------------------------------------------------------------------------------------------------------
# The parallel layout's rules, in one place
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutNames:
    """How a source names the layout's fields in its messages."""

    ep: str = "expert_parallel_size"
    tp: str = "tensor_parallel_size"
    nodes: str = "nodes"
    prefix: str = ""  # e.g. "serve args: "
    ep_value: str | None = None  # how to show the expert-parallel size when it is a product (cluster files)
    redundant: str | None = None  # the setting that adds redundant expert copies, where the source has one


ENGINE_NAMES = LayoutNames()


def check_layout(expert_parallel_size: int, tensor_parallel_size: int, cfg: TextConfig | None = None, *,
                 num_nodes_listed: int | None = None, redundant_experts: int | None = 0,
                 names: LayoutNames = ENGINE_NAMES) -> None:
    """Refuse a parallel layout the engine cannot run: `expert_parallel_size` workers in all, node-major,
    `tensor_parallel_size` per node. With the model's config it also checks what the model's shapes demand;
    `redundant_experts=None` skips the expert-slot rule (a given placement map decides the slots)."""
    ep, tp, n = expert_parallel_size, tensor_parallel_size, names
    err = lambda msg: EngineConfigError(n.prefix + msg)  # noqa: E731
    ep_shown = n.ep_value or str(ep)
    if ep < 1 or tp < 1:
        raise err(f"{n.ep} ({ep_shown}) and {n.tp} ({tp}) must be >= 1")
    if ep % tp:
        one_node = f"; use {n.ep}={tp} for one node" if ep < tp else ""
        raise err(f"{n.ep} ({ep_shown}) must be a multiple of {n.tp} ({tp}), the workers per node: each node holds "
                  f"the same number of workers{one_node}")
    if num_nodes_listed is not None and num_nodes_listed != ep // tp:
        raise err(f"{n.nodes} lists {num_nodes_listed} nodes but {n.ep} / {n.tp} = {ep_shown} / {tp} = {ep // tp}; "
                  "list one entry per node")
    if cfg is None:
        return
    for what, size in (("num_key_value_heads", cfg.num_key_value_heads), ("intermediate_size", cfg.intermediate_size),
                       ("intermediate_size_mlp", cfg.intermediate_size_mlp)):
        if size % tp:
            divisors = [d for d in range(1, size + 1) if size % d == 0]
            raise err(f"{n.tp} ({tp}) must divide the model's {what} ({size}): a node's workers split it evenly; "
                      f"choose a divisor of {size} ({', '.join(map(str, divisors[-4:]))})")
    if redundant_experts is None:
        return
    slots = cfg.num_local_experts + redundant_experts
    if ep > 1 and cfg.num_local_experts and slots % ep:
        extra = f" + {redundant_experts} redundant copies" if redundant_experts else ""
        more = -slots % ep
        fix = (f"set {n.redundant} to {redundant_experts + more}" if n.redundant else
               f"give a placement map with {more} redundant expert copies, or choose a size that divides {slots}")
        raise err(f"{n.ep} ({ep_shown}) does not divide the model's {cfg.num_local_experts} experts{extra}: every "
                  f"worker holds the same number of expert slots; {fix}")


# ---------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """The checkpoint, read once."""

    path: Path  # folder with config.json and tokenizer files
    text: TextConfig
    raw: dict  # config.json as written (workers get it instead of reading a copy of their own)
    dtype: str = "float32"
    device: str = "cpu"
    weights: str | None = None  # where tensors are read, if not `path`: a folder every node sees, or s3://...
    s3_endpoint_url: str | None = None
    cache_dir: str | None = None  # node-local cache for s3:// weights
    lora_adapter: str | None = None  # PEFT adapter folder merged into the weights as they load
    skip_tokenizer_init: bool = False  # no tokenizer (vLLM's option): prompts and outputs are token ids

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EngineConfigError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")

    @property
    def weights_source(self) -> str:
        return str(self.weights or self.path)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        try:
            raw = json.loads(cfg_file.read_text())
        except FileNotFoundError:
            raise EngineConfigError(f"{cfg_file} not found: give a checkpoint folder in the Hugging Face layout "
                                    "(config.json, safetensors, tokenizer files)") from None
        except ValueError as e:
            raise EngineConfigError(f"{cfg_file} is not valid JSON: {e}") from None
        return cls(path, TextConfig.from_dict(raw), raw, **kwargs)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache (serving/engine/kv_cache.py)."""

    max_model_len: int
    kv_cache_memory_bytes: float | None = None  # per process; with expert parallelism per worker
    block_size: int = 16  # tokens per block (vLLM's default); must divide the model's attention chunk
    enable_prefix_caching: bool = True  # reuse cached blocks of a shared prompt prefix (vLLM's default)
    mean_sequence_tokens: int = 2048  # how the budget is split between the global and chunked layers' pools

    def __post_init__(self) -> None:
        if self.max_model_len < 1:
            raise EngineConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise EngineConfigError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}; leave it "
                                    "unset to size the cache by max_num_seqs")
        if self.block_size < 1 or self.mean_sequence_tokens < 1:
            raise EngineConfigError(f"block_size ({self.block_size}) and mean_sequence_tokens "
                                    f"({self.mean_sequence_tokens}) must be >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ParallelConfig:
    """Expert parallelism over Ray workers: `expert_parallel_size` in all, `tensor_parallel_size` per node,
    node-major ranks (node 0's workers first)."""

    expert_parallel_size: int = 1
    tensor_parallel_size: int = 1
    nodes: tuple[str, ...] | None = None  # custom resource per node, pins each node's workers (tests, fixed plans)
    placement: Any = None  # cluster.placement.PlacementMap, a path to its JSON, or None (contiguous)
    placement_group: Any = None  # an existing Ray placement group (a Serve replica's): its last bundles are used
    num_cpus_per_worker: float = 0.5
    num_gpus_per_worker: float | None = None  # None: 1 on cuda, 0 on cpu
    num_threads_per_worker: int = 1
    step_timeout_s: float = 60.0
    counts_sync_interval_s: float = 1.0
    worker_env: dict = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.expert_parallel_size > 1 or self.tensor_parallel_size > 1

    @property
    def num_nodes(self) -> int:
        return self.expert_parallel_size // self.tensor_parallel_size

    def node_of(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def gpus_per_worker(self, device: str) -> float:
        if self.num_gpus_per_worker is not None:
            return self.num_gpus_per_worker
        return 1.0 if device == "cuda" else 0.0

    def validate(self, cfg: TextConfig | None, device: str, names: LayoutNames = ENGINE_NAMES) -> None:
        check_layout(self.expert_parallel_size, self.tensor_parallel_size, cfg,
                     num_nodes_listed=len(self.nodes) if self.nodes is not None else None,
                     redundant_experts=0 if self.placement is None else None, names=names)
        if not self.enabled:
            return
        if device not in ("cpu", "cuda"):
            raise EngineConfigError(f"{names.prefix}device {device!r}: expert-parallel workers run on 'cpu' or "
                                    "'cuda' (Ray gives each worker its own GPU, so name no index)")
        if device == "cuda" and self.gpus_per_worker(device) <= 0:
            raise EngineConfigError(f"{names.prefix}device='cuda' needs num_gpus_per_worker > 0 (1: one GPU per "
                                    "worker), else Ray gives the workers no GPU")

    def worker_bundles(self, device: str, num_cpus: float | None = None, num_gpus: float | None = None) -> list[dict]:
        """One Ray placement-group bundle per worker, rank order; pinned to `nodes` when given."""
        cpus = self.num_cpus_per_worker if num_cpus is None else num_cpus
        gpus = self.gpus_per_worker(device) if num_gpus is None else num_gpus
        bundles = []
        for rank in range(self.expert_parallel_size):
            b: dict = {"CPU": cpus}
            if gpus:
                b["GPU"] = gpus
            if self.nodes:
                b[self.nodes[self.node_of(rank)]] = 0.001
            bundles.append(b)
        return bundles


# ---------------------------------------------------------------------------------------------------------
# The whole
# ---------------------------------------------------------------------------------------------------------
_PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig}
_NOT_KWARGS = {"path", "text", "raw"}  # ModelConfig fields filled from the folder, not by the caller


def _kwarg_names() -> dict[str, str]:
    return {f.name: part for part, cls in _PARTS.items() for f in fields(cls) if f.name not in _NOT_KWARGS}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig

    @classmethod
    def from_kwargs(cls, path: str | Path, **kwargs) -> "EngineConfig":
        """`LLMEngine.from_pretrained`'s keywords (vLLM's names where vLLM has the concept), validated once."""
        known = _kwarg_names()
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, list(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keywords: {', '.join(sorted(known))}"
            raise TypeError(f"LLMEngine.from_pretrained got an unknown keyword {k!r}; {hint}")
        by_part: dict[str, dict] = {p: {} for p in _PARTS}
        for k, v in kwargs.items():
            by_part[known[k]][k] = v
        p = by_part["parallel"]
        if p.get("nodes") is not None:
            p["nodes"] = tuple(p["nodes"])
        if p.get("worker_env") is None:
            p.pop("worker_env", None)
        model = ModelConfig.load(path, **by_part["model"])
        c = by_part["cache"]
        if c.get("max_model_len") is None:
            c["max_model_len"] = min(model.text.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        config = cls(model, CacheConfig(**c), SchedulerConfig(**by_part["scheduler"]), ParallelConfig(**p))
        config.validate(given=set(kwargs))
        return config

    def validate(self, given: set[str] = frozenset()) -> None:
        m, c, par = self.model, self.cache, self.parallel
        if m.text.attention_chunk_size % c.block_size:
            raise EngineConfigError(f"block_size ({c.block_size}) must divide the model's attention_chunk_size "
                                    f"({m.text.attention_chunk_size}): a chunk's blocks are freed together")
        if c.max_model_len > m.text.max_position_embeddings:
            raise EngineConfigError(f"max_model_len ({c.max_model_len}) exceeds the model's max_position_embeddings "
                                    f"({m.text.max_position_embeddings}); lower max_model_len")
        par.validate(m.text, m.device)
        if not par.enabled:
            # Settings only the expert-parallel path reads: refuse them rather than ignore them.
            defaults = ParallelConfig()
            unused = [f.name for f in fields(ParallelConfig)
                      if f.name in given and f.name not in ("expert_parallel_size", "tensor_parallel_size")
                      and getattr(par, f.name) != getattr(defaults, f.name)]
            unused += [k for k in ("weights", "s3_endpoint_url", "cache_dir") if k in given and getattr(m, k)]
            if unused:
                raise EngineConfigError(
                    f"{unused[0]} is used only with expert parallelism (expert_parallel_size > 1 or "
                    f"tensor_parallel_size > 1); remove it, or set expert_parallel_size")

    @property
    def text(self) -> TextConfig:
        return self.model.text

"""The arguments of herd's Serve application (`build_app(args)`, a Serve config's `args:`), as a closed schema.

`herd render --target serve` writes these keys (cluster/render/serve.py) and `herd serve` builds them from its
flags; a typo such as `max_num_seq` is rejected with a "did you mean" before anything starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ServeConfigError, describe_validation_error


class ServeArgs(BaseModel):
    """What one herd Serve application serves and the limits each of its model replicas enforces."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Checkpoint folder (Hugging Face layout) the engine loads, or s3://bucket/prefix "
                                    "(expert parallelism: workers fetch their experts by byte range).")
    s3_endpoint_url: Optional[str] = Field(None, description="S3-compatible endpoint (MinIO, Ceph) for s3:// models.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the model replicas and their "
                                                                       "workers (not for secrets: prefer instance "
                                                                       "roles or the Serve config's runtime_env).")
    served_model_name: Optional[str] = Field(None, description="Name clients put in `model` (default: the "
                                                               "checkpoint folder's name, or the adapter's).")
    lora_adapter: Optional[str] = Field(None, description="PEFT LoRA adapter folder (finetune's output/adapter) "
                                                          "merged into the weights at load; every replica and "
                                                          "worker node must see the path.")
    expert_parallel_size: int = Field(1, ge=1, le=4096, description="Ray workers the routed experts are split over "
                                                                    "(1: the model runs inside the replica).")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Workers per node sharing the dense weights.")
    max_model_len: Optional[int] = Field(None, ge=16, description="Longest sequence (prompt + completion), tokens; "
                                                                  "default: the longest one sequence that "
                                                                  "kv_cache_memory_bytes holds, else 8192; never "
                                                                  "more than the checkpoint's context.")
    kv_cache_memory_bytes: Optional[float] = Field(None, gt=0, description="KV-cache memory of each model process "
                                                                           "(with expert parallelism, each worker: "
                                                                           "herd plan's per-GPU KV budget). None: "
                                                                           "the cache holds max_num_seqs sequences "
                                                                           "of max_model_len tokens.")
    mean_sequence_tokens: int = Field(2048, ge=1, description="Typical sequence length, tokens: a KV budget is split "
                                                              "between the global and chunked layers' blocks as "
                                                              "sequences this long need them.")
    max_num_seqs: int = Field(8, ge=1, le=65536, description="Sequences one replica runs at once (an upper bound: "
                                                             "the KV cache's free blocks decide).")
    max_waiting_requests: int = Field(32, ge=1, le=1_000_000, description="Requests a replica queues beyond "
                                                                          "max_num_seqs; more get 503.")
    num_replicas: int = Field(1, ge=1, le=1024, description="Model replicas (whole copies of the model).")
    api_keys_file: Optional[str] = Field(None, description="YAML mapping API keys to identities; none: no auth.")
    placement_file: Optional[str] = Field(None, description="Expert placement JSON from `herd plan` (default: "
                                                            "contiguous blocks).")
    nodes: Optional[list[str]] = Field(None, description="Custom resource naming each node of a replica; pins "
                                                         "expert-parallel workers to them.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bfloat16 on GPU, else float32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the in-replica model runs.")
    replica_num_cpus: float = Field(0.5, gt=0, le=256, description="CPUs reserved for each model replica.")
    replica_num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs for each model replica (EP=1 only).")
    worker_num_cpus: float = Field(0.5, gt=0, le=256, description="CPUs per expert-parallel worker.")
    worker_num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs per expert-parallel worker.")
    ingress_num_cpus: float = Field(0.1, gt=0, le=64, description="CPUs for the HTTP ingress replica.")
    product: str = Field("llm-api", min_length=1, description="Product name requests count under for the licence.")
    metrics_require_key: bool = Field(False, description="GET /metrics needs a valid API key too (with "
                                                        "api_keys_file); off: open to any scraper that can reach it.")
    require_licensing: bool = Field(False, description="Refuse to start unless users are counted for the licence "
                                                      "(HERD_LICENSING_KEY set where the server runs).")
    licensing_store: Optional[str] = Field(None, description="Where replicas record users (folder or s3:// URL); "
                                                             "default: $HERD_LICENSING_STORE, else ./herd-data/"
                                                             "licensing, made absolute when the app is built.")
    trust_user_field: Optional[bool] = Field(None, description="Count the body's `user` / the X-User-Id header as "
                                                               "the licence's user (namespaced by the key's identity "
                                                               "when keys are set). Default: on without "
                                                               "api_keys_file, off with one (the key's identity "
                                                               "counts).")
    app_name: str = Field("herd", min_length=1, description="Serve application name (names the metrics hub).")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After sent with 503 when the queue is full.")
    prefix_cache_per_api_key: bool = Field(False, description="Share cached prompt blocks only between requests of "
                                                                "the same API key (a shared prefix cache is a timing "
                                                                "side channel between tenants).")
    stream_interval_s: float = Field(0.0, ge=0, le=1.0, description="Streaming: send the tokens gathered over this "
                                                                      "long as one chunk (0: every engine step). "
                                                                      "Fewer chunks cost less CPU per token.")
    max_images_per_request: int = Field(8, ge=0, le=64, description="Images one request may carry (0: no images). "
                                                                     "Each can take up to 17 tiles (16 + global).")
    max_image_bytes: int = Field(5 * 2**20, ge=1024, le=2**30, description="Largest encoded image, bytes (its "
                                                                           "base64 must fit the 8 MiB request body).")
    max_image_pixels: int = Field(40_000_000, ge=1, le=2**31, description="Largest image, width x height, "
                                                                          "checked before it is decoded.")
    image_url_allowed_hosts: list[str] = Field(default_factory=list, description="Hosts that http(s) image URLs "
                                                                                 "may name (empty: data: URLs only).")
    image_fetch_timeout_s: float = Field(10.0, gt=0, le=120, description="Time limit for fetching one image URL.")

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        from serving.config import check_layout

        check_layout(self.expert_parallel_size, self.tensor_parallel_size,
                     num_nodes_listed=len(self.nodes) if self.nodes else None, redundant_experts=None)
        if self.expert_parallel_size > 1 and self.device == "cuda" and self.worker_num_gpus <= 0:
            raise ValueError("device 'cuda' with expert_parallel_size > 1 runs the model on the workers: set "
                             "worker_num_gpus (1: one GPU per worker)")
        return self

    def parallel_config(self):
        """The engine's `serving.config.ParallelConfig` for these args (what the replicas will build)."""
        from serving.config import ParallelConfig

        return ParallelConfig(self.expert_parallel_size, self.tensor_parallel_size,
                              tuple(self.nodes) if self.nodes else None, placement=self.placement_file,
                              num_cpus_per_worker=self.worker_num_cpus, num_gpus_per_worker=self.worker_num_gpus)

    def image_limits(self):
        """The `serving.image_io.ImageLimits` the replicas check request images against."""
        from serving.image_io import ImageLimits

        return ImageLimits(self.max_images_per_request, self.max_image_bytes, self.max_image_pixels,
                           tuple(self.image_url_allowed_hosts), self.image_fetch_timeout_s)

    def fit_max_model_len(self, cfg) -> tuple["ServeArgs", str | None]:
        """These args with `max_model_len` decided for a checkpoint of `cfg` (a TextConfig), and a note saying why
        when the default is below the checkpoint's context; ValueError for a max_model_len the cache cannot hold.

        Default: the longest single sequence `kv_cache_memory_bytes` holds (at most the checkpoint's context), else
        min(context, 8192), since without a budget the engine reserves max_num_seqs x max_model_len tokens (at
        Scout's 10M-token context not one sequence would allocate). The KV dtype is the served dtype; with
        `dtype: auto` and no GPU asked for it is taken as float32, which can only lower the default."""
        from dataclasses import replace

        from llama4.sizing import DEFAULT_BLOCK_SIZE, kv_bytes_per_token, longest_sequence
        from serving.config import DEFAULT_MAX_MODEL_LEN

        context = cfg.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > context:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the checkpoint's context "
                             f"(max_position_embeddings {context}); lower max_model_len")
        if self.kv_cache_memory_bytes is None:
            if self.max_model_len is not None:
                return self, None
            n = min(context, DEFAULT_MAX_MODEL_LEN)
            why = (f"max_model_len defaults to {n} tokens, below the checkpoint's context ({context}): without "
                   f"kv_cache_memory_bytes the KV cache is sized as max_num_seqs ({self.max_num_seqs}) x max_model_len tokens; set max_model_len, or "
                   "kv_cache_memory_bytes to size it from memory")
            return self.model_copy(update={"max_model_len": n}), (why if n < context else None)
        gpu = self.device == "cuda" or self.worker_num_gpus > 0 or self.replica_num_gpus > 0
        dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(self.dtype, "bf16" if gpu else "fp32")
        full = kv_bytes_per_token(cfg, dtype)
        tp = self.tensor_parallel_size  # each worker of a node keeps 1/tp of the KV heads
        per = replace(full, per_layer=full.per_layer / tp)
        holds = longest_sequence(per, self.kv_cache_memory_bytes, DEFAULT_BLOCK_SIZE, limit=context)
        budget = f"kv_cache_memory_bytes ({int(self.kv_cache_memory_bytes)}, {dtype} at tensor_parallel_size {tp})"
        if self.max_model_len is not None:
            if self.max_model_len > holds:
                raise ValueError(f"max_model_len ({self.max_model_len}) is longer than one sequence {budget} holds "
                                 f"({holds} tokens); lower max_model_len to {holds} or raise kv_cache_memory_bytes")
            return self, None
        if holds < 16:
            raise ValueError(f"{budget} holds {holds} tokens of one sequence, fewer than 16; raise it")
        why = (f"max_model_len defaults to {holds} tokens, below the checkpoint's context ({context}): the longest "
               f"single sequence {budget} holds; set max_model_len lower, or raise the budget")
        return self.model_copy(update={"max_model_len": holds}), (why if holds < context else None)

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.lora_adapter:
            return adapter_name(self.lora_adapter)
        return Path(self.model.rstrip("/")).name


def adapter_name(folder: str) -> str:
    """The name finetune gave the adapter (its job's metrics.json, beside `adapter/`), else the folder's name."""
    import json

    path = Path(folder.rstrip("/"))
    try:
        return json.loads((path.parent / "metrics.json").read_text())["adapter_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return path.name


def parse_args(args: dict) -> ServeArgs:
    """Validate `build_app` arguments; a `ServeConfigError` names the key, the value and the fix, and suggests
    the closest known key for a misspelt one."""
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as e:
        raise ServeConfigError(describe_validation_error(e, ServeArgs, source="serve args")) from None

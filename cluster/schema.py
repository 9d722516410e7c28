"""The cluster file: one closed, typed YAML schema that ops teams write once per cluster.

`load_cluster(path)` reads YAML with `yaml.safe_load`, validates it against `ClusterSpec` (pydantic, unknown
keys rejected), then checks what one field cannot check alone (the serving node group exists, the
expert-parallel size matches the replica and divides the experts, the context fits the model). Every
failure is a `ClusterFileError` (a `UserError`, exit code 2) whose one-line message names the YAML path,
the bad value and the fix, with "did you mean" for misspelt keys and names.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.gpus import GIB, GPU_KINDS, GpuKind
from common.errors import (ClusterFileError, describe_validation_error, did_you_mean, line_for, path_loc,
                           yaml_key_lines)
from llama4.config import TextConfig

def _location(v: str | None) -> str | None:
    """A local path or s3://bucket[/prefix]: the two places herd reads and writes."""
    if v is None:
        return v
    if "://" in v and not v.startswith("s3://"):
        raise ValueError(f"{v.split('://')[0]}:// is not supported; use a local path or s3://bucket/prefix")
    if v.startswith("s3://") and not v[5:].split("/")[0]:
        raise ValueError("s3:// URI has no bucket; write s3://bucket/prefix")
    if not v.strip():
        raise ValueError("empty path; give a local path or s3://bucket/prefix")
    return v


Location = Annotated[str, AfterValidator(_location)]
WeightDtype = Literal["bf16", "fp8", "int4", "fp32"]
KVDtype = Literal["bf16", "fp8", "fp32"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeGroup(_Closed):
    """A set of identical nodes."""

    name: str = Field(description="name of the group, lowercase letters, digits and dashes (e.g. 'gpu')",
                      pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=40)
    gpu: str = Field(description=f"accelerator kind, one of: {', '.join(GPU_KINDS)}")
    gpu_memory_gib: float | None = Field(None, gt=0, le=1024,
                                         description="override the kind's memory per GPU, in GiB")
    gpus_per_node: int = Field(ge=1, le=16, description="GPUs per node (for gpu: cpu, worker processes per node)")
    count: int = Field(1, ge=1, le=1024, description="number of nodes in the group")
    cpus: int = Field(ge=1, le=1024, description="CPUs Ray may use on each node")
    ram_gib: float = Field(gt=0, le=65536, description="RAM Ray may use on each node, in GiB")
    price_per_hour: float | None = Field(None, ge=0, description="price of one node per hour, in dollars")
    instance_type: str | None = Field(None, description="cloud instance type, e.g. p5.48xlarge (AWS)")
    disk_gib: int = Field(1000, ge=50, le=65536, description="root disk per node in GiB (weights are cached there)")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str) -> str:
        if v not in GPU_KINDS:
            raise ValueError(f"unknown GPU kind{did_you_mean(v, GPU_KINDS)}; choose one of: {', '.join(GPU_KINDS)}")
        return v

    @property
    def kind(self) -> GpuKind:
        return GPU_KINDS[self.gpu]

    def memory_per_gpu(self) -> int:
        """Bytes one GPU (or, for cpu, one worker process's share of RAM) holds."""
        if self.gpu_memory_gib is not None:
            return int(self.gpu_memory_gib * GIB)
        if self.kind.is_cpu:
            return int(self.ram_gib * GIB / self.gpus_per_node)
        return self.kind.memory_bytes


class HeadNode(_Closed):
    """The Ray head node (no model workers run there)."""

    instance_type: str = Field("m7i.2xlarge", description="cloud instance type of the head node")
    cpus: int = Field(8, ge=1, le=1024, description="CPUs on the head node")
    ram_gib: float = Field(32, gt=0, le=65536, description="RAM on the head node, in GiB")
    price_per_hour: float | None = Field(None, ge=0, description="price of the head node per hour, in dollars")


class Provider(_Closed):
    """Where the nodes come from: what `herd render --target ray-cluster` writes for."""

    cloud: Literal["local", "aws", "kubernetes"] = Field("local", description="local, aws or kubernetes")
    region: str | None = Field(None, description="cloud region, e.g. us-east-1")
    availability_zone: str | None = Field(None, description="availability zone, e.g. us-east-1a")
    namespace: str = Field("default", description="Kubernetes namespace for KubeRay manifests")


class Runtime(_Closed):
    """What runs on the nodes."""

    image: str = Field("ghcr.io/your-org/herd:0.1.0", description="container image built from infra/Dockerfile")
    pip: str = Field("llama-herd==0.1.0", description="pip requirement the setup commands install herd from")


class Model(_Closed):
    """The model: its shape (a preset or a checkpoint's config.json) and the dtypes it is held in."""

    preset: str | None = Field(None, description="llama4 preset name (scout, maverick, maverick-tiny, ...)")
    checkpoint: Location | None = Field(None, description="checkpoint folder or s3:// URI in the Hugging Face layout")
    weight_dtype: WeightDtype = Field("bf16", description="bf16, fp8 (routed experts in fp8, as Meta released), "
                                                          "int4 (every linear weight, group scales) or fp32")
    kv_cache_dtype: KVDtype = Field("bf16", description="KV-cache dtype: bf16, fp8 or fp32")


class ServingImages(_Closed):
    """Limits on the images in requests (Llama 4 reads several per prompt; each can take 17 tiles)."""

    max_per_request: int = Field(8, ge=0, le=64, description="images one request may carry (0: text only)")
    max_bytes: int = Field(5 * 2**20, ge=1024, le=2**30, description="largest encoded image, bytes")
    max_pixels: int = Field(40_000_000, ge=1, le=2**31, description="largest image, width x height")
    url_allowed_hosts: list[str] = Field(default_factory=list, description="hosts http(s) image URLs may name "
                                                                           "(empty: data: URLs only)")


class Serving(_Closed):
    """How the model is served: replicas, their size, and the limits each replica enforces."""

    node_group: str | None = Field(None, description="node group that runs the model (default: the first)")
    replicas: int = Field(1, ge=1, le=1024, description="model replicas (whole copies of the model)")
    nodes_per_replica: int = Field(1, ge=1, le=64, description="nodes one model replica spans")
    expert_parallel_size: int | None = Field(None, ge=1, description="GPUs the routed experts are split over; "
                                                                     "must equal nodes_per_replica x gpus_per_node")
    redundant_experts: int = Field(0, ge=0, le=1024, description="extra expert copies per MoE layer")
    max_context_len: int = Field(8192, ge=16, description="longest sequence (prompt + output) in tokens "
                                                          "(default 8192, or the model's limit if lower)")
    max_concurrent_sequences: int = Field(32, ge=1, le=65536, description="sequences one replica runs at once")
    mean_sequence_tokens: int = Field(2048, ge=16, description="typical sequence length (prompt + output) in tokens: "
                                                               "the paged KV cache's pools are split for it and "
                                                               "herd plan counts sequences of it (default 2048, or "
                                                               "max_context_len if lower)")
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1.0, description="share of each GPU's memory herd may use")
    runtime_reserve_gib: float = Field(2.0, ge=0, le=64, description="per-GPU memory kept for activations, "
                                                                     "CUDA context and exchange buffers, GiB")
    model_name: str | None = Field(None, description="name clients use in requests (default: from the model)")
    api_keys_file: str | None = Field(None, description="file mapping API keys to identities (none: no auth)")
    require_licensing: bool | None = Field(None, description="refuse to start without HERD_LICENSING_KEY, so users "
                                                             "are always counted for the licence (default: on for "
                                                             "cloud clusters, off for local ones)")
    placement_file: str | None = Field(None, description="expert placement JSON (default: contiguous blocks)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy")
    images: ServingImages = Field(default_factory=ServingImages, description="limits on request images")


class Storage(_Closed):
    """Where herd keeps checkpoints, adapters and records."""

    uri: Location = Field("./herd-data", description="local folder or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/]+", description="S3-compatible endpoint URL "
                                                                                   "(http(s)://host[:port])")
    region: str | None = Field(None, description="S3 region")


class Licensing(_Closed):
    """Llama 4 licence bookkeeping for served requests (the hashing key stays in $HERD_LICENSING_KEY, never here)."""

    store: Location | None = Field(None, description="local folder or s3:// prefix for MAU records "
                                                      "(default: <storage.uri>/licensing)")
    product: str = Field("llm-api", min_length=1, max_length=100,
                         description="product name the served requests count under")


class ClusterSpec(_Closed):
    """A whole cluster: nodes, the model, how it is served, storage and licensing."""

    name: str = Field(description="cluster name: lowercase letters, digits and dashes",
                      pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=50)
    provider: Provider = Field(default_factory=Provider, description="where the nodes come from")
    head: HeadNode = Field(default_factory=HeadNode, description="the Ray head node")
    node_groups: list[NodeGroup] = Field(min_length=1, description="groups of identical worker nodes")
    model: Model = Field(description="the model and its dtypes")
    serving: Serving = Field(default_factory=Serving, description="replicas and limits")
    storage: Storage = Field(default_factory=Storage, description="checkpoint and record storage")
    licensing: Licensing = Field(default_factory=Licensing, description="licence bookkeeping")
    runtime: Runtime = Field(default_factory=Runtime, description="container image and herd package")

    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))

    @property
    def serving_group(self) -> NodeGroup:
        """The node group that runs the model."""
        want = self.serving.node_group
        return next(g for g in self.node_groups if want is None or g.name == want)

    @property
    def expert_parallel_size(self) -> int:
        return self.serving.nodes_per_replica * self.serving_group.gpus_per_node

    @property
    def served_model_name(self) -> str:
        return self.serving.model_name or f"llama4-{self.model.preset or Path(str(self.model.checkpoint)).name}"

    @cached_property
    def text_config(self) -> TextConfig:
        """The model's shape, from the preset or the checkpoint's config.json."""
        return resolve_text_config(self.model)


    @cached_property
    def vision_config(self) -> dict | None:
        """The model's `vision_config` (preset or checkpoint config.json); None for a text-only checkpoint."""
        from llama4.presets import PRESETS

        if self.model.preset is not None:
            return dict(PRESETS[self.model.preset].vision)
        import json

        return json.loads((Path(str(self.model.checkpoint)) / "config.json").read_text()).get("vision_config")


def resolve_text_config(model: Model) -> TextConfig:
    """The model's `TextConfig`: the preset's shape, else the local checkpoint's config.json."""
    from llama4.presets import PRESETS

    if model.preset is not None:
        if model.preset not in PRESETS:
            raise ClusterFileError(f"model.preset: unknown preset {model.preset!r}{did_you_mean(model.preset, PRESETS)};"
                                   f" choose one of: {', '.join(PRESETS)}")
        return PRESETS[model.preset].text_config()
    ckpt = str(model.checkpoint)
    if ckpt.startswith("s3://"):
        raise ClusterFileError(f"model.preset: needed when model.checkpoint is an s3:// URI ({ckpt}), since the planner "
                               "does not read S3; set model.preset to the checkpoint's shape, e.g. maverick")
    if not (Path(ckpt) / "config.json").is_file():
        raise ClusterFileError(f"model.checkpoint: {ckpt!r} has no config.json; give a checkpoint folder in the "
                               "Hugging Face layout, or set model.preset to plan by shape")
    return TextConfig.from_pretrained(ckpt)


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and fully check a cluster file; raise `ClusterFileError` with a one-line message on any mistake."""
    path = Path(path)
    try:
        import yaml

        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise ClusterFileError(f"{path}: no such file; give the path of a cluster YAML (see infra/clusters/)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ClusterFileError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    return parse_cluster(raw, source=str(path), lines=yaml_key_lines(text))


def parse_cluster(raw: Any, source: str = "<cluster>", lines: dict[tuple, int] | None = None) -> ClusterSpec:
    """Validate an already-parsed cluster document (what `load_cluster` does after reading YAML).

    `lines` maps YAML paths to line numbers, so errors read `file:line: path: problem`.
    """
    try:
        return _parse(raw, source)
    except ClusterFileError as e:
        if not lines:
            raise
        msg = str(e)[len(source) + 2:]
        line = line_for(path_loc(msg.split(":", 1)[0]), lines)
        raise ClusterFileError(f"{source}:{line}: {msg}" if line else str(e)) from None


def _parse(raw: Any, source: str) -> ClusterSpec:
    if not isinstance(raw, dict):
        raise ClusterFileError(f"{source}: the file must be a YAML mapping with keys name, node_groups, model, ...; "
                               f"got {type(raw).__name__}")
    try:
        spec = ClusterSpec.model_validate(raw)
    except ValidationError as e:
        raise ClusterFileError(describe_validation_error(e, ClusterSpec, source)) from None
    serving = raw.get("serving") if isinstance(raw.get("serving"), dict) else {}
    if "max_context_len" not in serving:
        spec = _default_context(spec)
    if "mean_sequence_tokens" not in serving and spec.serving.mean_sequence_tokens > spec.serving.max_context_len:
        spec = spec.model_copy(update={"serving": spec.serving.model_copy(
            update={"mean_sequence_tokens": spec.serving.max_context_len})})
    try:
        _check_consistency(spec)
    except ClusterFileError as e:
        raise ClusterFileError(f"{source}: {e}") from None
    return spec


def _default_context(spec: ClusterSpec) -> ClusterSpec:
    """An unset max_context_len is 8192 or the model's own limit, whichever is lower."""
    try:
        limit = spec.text_config.max_position_embeddings
    except ClusterFileError:
        return spec  # reported by _check_consistency with the right path
    if limit >= spec.serving.max_context_len:
        return spec
    return spec.model_copy(update={"serving": spec.serving.model_copy(update={"max_context_len": limit})})


def _check_consistency(spec: ClusterSpec) -> None:
    """Rules that span fields; each error names the YAML path and the fix."""
    s, m = spec.serving, spec.model
    if m.preset is None and m.checkpoint is None:
        raise ClusterFileError("model: give model.preset (e.g. maverick) or model.checkpoint (a folder or s3:// URI)")
    names = [g.name for g in spec.node_groups]
    if len(set(names)) != len(names):
        raise ClusterFileError(f"node_groups: names must be unique, got {names}; rename the duplicates")
    if s.node_group is not None and s.node_group not in names:
        raise ClusterFileError(f"serving.node_group: no node group {s.node_group!r}{did_you_mean(s.node_group, names)};"
                               f" choose one of: {', '.join(names)}")
    cfg = spec.text_config
    _check_checkpoint_matches_preset(m, cfg)
    group = spec.serving_group
    gi = spec.node_groups.index(group)
    ep = spec.expert_parallel_size
    if s.expert_parallel_size is not None and s.expert_parallel_size != ep:
        raise ClusterFileError(
            f"serving.expert_parallel_size: {s.expert_parallel_size} does not match the replica's GPUs "
            f"(serving.nodes_per_replica {s.nodes_per_replica} x node_groups[{gi}].gpus_per_node "
            f"{group.gpus_per_node} = {ep}); set it to {ep} or remove it")
    # The engine's own layout rules (serving/config.py), named as this file names them.
    from serving.config import EngineConfigError, LayoutNames, check_layout

    key = "serving.expert_parallel_size" if s.expert_parallel_size is not None else "serving.nodes_per_replica"
    names = LayoutNames(ep=f"serving.nodes_per_replica x node_groups[{gi}].gpus_per_node",
                        tp=f"node_groups[{gi}].gpus_per_node",
                        ep_value=f"{s.nodes_per_replica} x {group.gpus_per_node} = {ep}",
                        redundant="serving.redundant_experts")
    try:
        check_layout(ep, group.gpus_per_node, cfg, redundant_experts=s.redundant_experts, names=names)
    except EngineConfigError as e:
        slots = cfg.num_local_experts + s.redundant_experts
        if "experts" not in str(e):
            raise ClusterFileError(f"node_groups[{gi}].gpus_per_node: {e}") from None
        good = [n for n in range(1, 2 * s.nodes_per_replica + 2) if slots % (n * group.gpus_per_node) == 0]
        node_fix = f"; or use {' or '.join(map(str, good[-3:]))} nodes per replica" if good else ""
        raise ClusterFileError(f"{key}: {e}{node_fix}") from None
    if s.max_context_len > cfg.max_position_embeddings:
        raise ClusterFileError(f"serving.max_context_len: {s.max_context_len} exceeds the model's "
                               f"max_position_embeddings {cfg.max_position_embeddings}; lower it")
    if s.mean_sequence_tokens > s.max_context_len:
        raise ClusterFileError(f"serving.mean_sequence_tokens: {s.mean_sequence_tokens} exceeds serving.max_context_len "
                               f"{s.max_context_len} (no sequence is longer); lower it or raise max_context_len")
    if s.redundant_experts and ep == 1:
        raise ClusterFileError("serving.redundant_experts: a replica of one GPU gains nothing from extra copies; "
                               "set it to 0")


def _check_checkpoint_matches_preset(m: Model, cfg: TextConfig) -> None:
    if m.preset is None or m.checkpoint is None or not (Path(m.checkpoint) / "config.json").is_file():
        return
    theirs = TextConfig.from_pretrained(m.checkpoint)
    for field in ("hidden_size", "num_hidden_layers", "num_local_experts", "moe_layers"):
        if getattr(theirs, field) != getattr(cfg, field):
            raise ClusterFileError(
                f"model.preset: {m.preset!r} has {field} {getattr(cfg, field)} but model.checkpoint "
                f"{m.checkpoint!r} has {getattr(theirs, field)}; set model.preset to the checkpoint's shape or "
                "remove it")

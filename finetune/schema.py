"""The fine-tuning job file: a closed, typed schema for what users write in JOB.yaml, validated at the edge.

`load_job(path)` reads the YAML (safe_load), rejects unknown keys with a "did you mean", checks bounds and the
licence naming rule, and returns a `Job`. Every error is a `JobFileError` whose message names the YAML path of
the bad field, the value, and the fix (a `UserError`, so `python -m finetune` and `herd finetune` print one line).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import JobFileError, UserError, describe_validation_error, yaml_key_lines


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Settings(_Closed):
    """Where `s3://` paths live. Credentials come from the usual AWS_* environment variables, never this file."""

    endpoint_url: Optional[str] = Field(
        None, description="S3-protocol endpoint (MinIO, Ceph, a local test server); empty for AWS itself.")
    region: str = Field("us-east-1", description="Region to sign requests for.")


class DatasetSpec(_Closed):
    """Training rows: OpenAI-style `messages` lists, or `prompt`/`completion` pairs."""

    path: str = Field(description="JSONL or Parquet file or folder, local or s3://bucket/key.")
    format: Optional[Literal["jsonl", "parquet"]] = Field(
        None, description="File format; inferred from the suffix (.jsonl/.json or .parquet) when omitted.")
    packing: bool = Field(False, description="Concatenate short examples into full-length sequences.")

    @model_validator(mode="after")
    def _infer_format(self) -> "DatasetSpec":
        if self.format is None:
            suffix = Path(self.path.rstrip("/")).suffix.lower()
            fmt = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix)
            if fmt is None:
                raise ValueError(f"cannot tell the format of {self.path!r} from its suffix; "
                                 "set dataset.format to 'jsonl' or 'parquet'")
            object.__setattr__(self, "format", fmt)
        return self


class LoraTargets(_Closed):
    """Which parts of each layer get LoRA. The router always stays frozen (changing routing destabilises MoE)."""

    attention: bool = Field(True, description="q/k/v/o projections of every layer.")
    shared_expert: bool = Field(True, description="The shared expert's gate/up/down projections (MoE layers).")
    routed_experts: bool = Field(
        True, description="The fused routed-expert tensors (gate_up_proj, down_proj) via PEFT target_parameters.")
    dense_mlp: bool = Field(False, description="The dense MLP of non-MoE layers (Maverick's even layers).")


class LoraSpec(_Closed):
    """LoRA hyper-parameters."""

    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on LoRA inputs; must be 0 for routed experts.")
    targets: LoraTargets = Field(default_factory=LoraTargets, description="Which modules get adapters.")

    @model_validator(mode="after")
    def _check(self) -> "LoraSpec":
        t = self.targets
        if not (t.attention or t.shared_expert or t.routed_experts or t.dense_mlp):
            raise ValueError("lora.targets turns every target off; enable at least one (e.g. attention: true)")
        if t.routed_experts and self.dropout != 0.0:
            raise ValueError(f"lora.dropout is {self.dropout}, but LoRA on the fused routed experts "
                             "(PEFT target_parameters) supports no dropout; set lora.dropout: 0 or "
                             "lora.targets.routed_experts: false")
        return self


class DeepSpeedSpec(_Closed):
    """How DeepSpeed shards training state across workers."""

    zero_stage: Literal[0, 2, 3] = Field(
        2, description="2: shard optimizer state and gradients; 3: also parameters; 0: no sharding (like DDP).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (GPU runs).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory; ZeRO stage 3 only.")

    @model_validator(mode="after")
    def _check(self) -> "DeepSpeedSpec":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage: 3")
        return self


class ResourcesSpec(_Closed):
    """The Ray Train worker group."""

    workers: int = Field(2, ge=1, le=4096, description="Number of training workers (data-parallel ranks).")
    gpus_per_worker: int = Field(0, ge=0, le=8, description="GPUs per worker; 0 trains on CPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker (fractions allowed).")


class TrainingSpec(_Closed):
    """Optimisation settings."""

    batch_size: int = Field(4, ge=1, description="Sequences per worker per micro-step.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    sequence_length: int = Field(512, ge=8, le=1_048_576, description="Tokens per sequence (longer are cut).")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    steps: Optional[int] = Field(None, ge=1, description="Optimizer steps to run; or give epochs.")
    epochs: Optional[float] = Field(None, gt=0, description="Passes over the data; or give steps.")
    seed: int = Field(0, ge=0, description="Seed for LoRA init and data order.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Compute dtype of base and adapter.")

    @model_validator(mode="after")
    def _check(self) -> "TrainingSpec":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of training.steps or training.epochs")
        return self


class CheckpointSpec(_Closed):
    """Where and how often training state is saved."""

    storage_path: str = Field(description="Local folder or s3://bucket/prefix; the run lives under <name>/.")
    every_steps: int = Field(50, ge=1, description="Save adapter + optimizer state + data position this often.")
    keep: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    max_failures: int = Field(3, ge=-1, description="Worker failures to recover from (-1: unlimited).")


class AdapterSpec(_Closed):
    """The adapter produced, and what happens to it (which decides the licence's naming rule)."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Adapter name; must begin with 'Llama' when distributed.")
    distributed: bool = Field(
        description="Will the model be distributed or made available to others (serving it to users counts)?")


class Job(_Closed):
    """One LoRA fine-tuning job."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Run name; resubmitting the same name resumes from its last checkpoint.")
    base_model: str = Field(description="Llama 4 checkpoint folder (HF layout), local or s3://.")
    dataset: DatasetSpec
    adapter: AdapterSpec
    checkpoint: CheckpointSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    training: TrainingSpec
    s3: S3Settings = Field(default_factory=S3Settings)

    @property
    def run_path(self) -> str:
        """Storage location of this run: checkpoints, then `output/` when done."""
        return self.checkpoint.storage_path.rstrip("/") + "/" + self.name


# ---------------------------------------------------------------------------------------------------------
# Loading, with errors a user can act on
# ---------------------------------------------------------------------------------------------------------
def parse_job(data: Any, source: str = "job file", lines: dict[tuple, int] | None = None) -> Job:
    """Validate already-parsed YAML; raise JobFileError naming the first problem (and counting the others).

    `lines` maps YAML paths to line numbers (`common.errors.yaml_key_lines`), so errors read `file:line: ...`.
    """
    if not isinstance(data, dict):
        raise JobFileError(f"{source}: expected a mapping of keys (name:, base_model:, ...), got {type(data).__name__}")
    try:
        job = Job.model_validate(data)
    except ValidationError as e:
        raise JobFileError(describe_validation_error(e, Job, source=source, lines=lines)) from None
    from licensing import require_llama_prefix

    try:
        require_llama_prefix(job.adapter.name, job.adapter.distributed)
    except UserError as e:
        raise JobFileError(f"{source}: adapter.name: {e}") from None
    return job


def load_job(path: str | Path) -> Job:
    """Read and validate a job file."""
    p = Path(path)
    if not p.is_file():
        raise JobFileError(f"job file {p} does not exist")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobFileError(f"{p}: not valid YAML: {e}") from None
    return parse_job(data, source=str(p), lines=yaml_key_lines(text))

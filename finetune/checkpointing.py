"""Training checkpoints: what a resumed run needs to continue the same loss curve, saved through Ray Train.

A checkpoint folder holds
- `ds/state/`: DeepSpeed's own files, one optimizer-state partition per rank (ZeRO) plus the trainable weights
  (`exclude_frozen_parameters`: the frozen base is never copied), the LR scheduler and step counters;
- `adapter/`: the LoRA adapter in PEFT format (rank 0; gathered first under ZeRO-3);
- `progress.json`: the next step (which fixes the data position, see data.BatchOrder), the loss history and
  the steps at which the run resumed.
Every rank reports its own folder; Ray Train merges them into one checkpoint under `storage_path/<name>/` and
hands the latest back through `ray.train.get_checkpoint()` after a worker failure or on resubmission.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

DS_TAG = "state"


@dataclass
class Progress:
    """Where the run is: `step` optimizer steps are done; the history is one entry per step."""

    step: int = 0
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "tokens", "lr", "seconds"}
    resumed_at: list[int] = field(default_factory=list)
    tokens: int = 0
    peak_rss_mb: list[float] = field(default_factory=list)  # per rank, highest seen so far
    end_rss_mb: list[float] = field(default_factory=list)  # per rank, at the latest checkpoint
    loaded_param_share: float | None = None  # rank 0's share of the parameters after loading (ZeRO-3: ~1/workers)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        return cls(**json.loads(text))


@contextlib.contextmanager
def gathered(params: list, zero_stage: int):
    """Full values of (possibly ZeRO-3-partitioned) parameters for the duration of the block, on every rank."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def save_adapter(peft_model, out_dir: str | Path, rank: int, zero_stage: int) -> None:
    """Write the adapter in PEFT format on rank 0 (all ranks must call: ZeRO-3 gathers collectively)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    with gathered(params, zero_stage):
        if rank == 0:
            peft_model.save_pretrained(str(out_dir), safe_serialization=True)


def save(engine, peft_model, progress: Progress, metrics: dict, rank: int, zero_stage: int) -> None:
    """Write this rank's part of a checkpoint and report it to Ray Train (a barrier across ranks)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="herd-ckpt-") as tmp:
        engine.save_checkpoint(str(Path(tmp) / "ds"), tag=DS_TAG, exclude_frozen_parameters=True)
        save_adapter(peft_model, Path(tmp) / "adapter", rank, zero_stage)
        if rank == 0:
            (Path(tmp) / "progress.json").write_text(progress.to_json())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step{progress.step:07d}")


def restore(engine) -> Progress | None:
    """Load the latest checkpoint Ray Train hands this run, if any; returns its progress."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        engine.load_checkpoint(str(Path(d) / "ds"), tag=DS_TAG, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
        progress = Progress.from_json((Path(d) / "progress.json").read_text())
    progress.resumed_at.append(progress.step)
    return progress

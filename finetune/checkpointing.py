"""Training checkpoints: what a resumed run needs to continue the same loss curve, saved through Ray Train.

A checkpoint folder holds
- `ds/state/`: DeepSpeed's own files, one optimizer-state partition per rank (ZeRO) plus the trainable weights
  (`exclude_frozen_parameters`: the frozen base is never copied), the LR scheduler and step counters;
- `adapter/`: the LoRA adapter in PEFT format (rank 0; gathered first under ZeRO-3);
- `progress.json`: the next step (which fixes the data position, see data.BatchOrder), the loss history and
  the steps at which the run resumed;
- `settings.json`: the job's resume-relevant settings and their hash. A resubmitted run whose settings differ is
  refused (listing the differences) before any worker starts and before any DeepSpeed file is loaded.
Trust: DeepSpeed's files are loaded with `torch.load(weights_only=False)`, which can run code: whoever can write
under `storage_path` can run code in the training workers. Keep it writable by the jobs only.
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
SETTINGS_FILE = "settings.json"
# What a resumed run must share with the run that wrote its checkpoints (more steps or epochs are fine: that is how
# a run is trained further; checkpoint cadence, S3 endpoint and the adapter's name may change too).
RESUME_FIELDS = ("base_model", "dataset", "lora", "deepspeed.zero_stage", "resources.workers", "training")
_FREE_TRAINING_FIELDS = ("steps", "epochs")


def resume_settings(job) -> dict[str, object]:
    """The job's resume-relevant settings, flattened to dotted names."""
    doc = job.model_dump(mode="json")
    out: dict[str, object] = {}
    for field_path in RESUME_FIELDS:
        value = doc
        for part in field_path.split("."):
            value = value[part]
        _flatten(field_path, value, out)
    for name in _FREE_TRAINING_FIELDS:
        out.pop(f"training.{name}", None)
    return out


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def settings_document(job) -> dict:
    """What settings.json holds."""
    import hashlib

    settings = resume_settings(job)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "settings": settings}


def settings_differences(stored: dict, current: dict) -> list[str]:
    """'name: A in the checkpoint, B now' for every setting that differs."""
    diffs = []
    for k in sorted(stored.keys() | current.keys()):
        a, b = stored.get(k, "(not set)"), current.get(k, "(not set)")
        if a != b:
            diffs.append(f"{k}: {a} in the checkpoint, {b} now")
    return diffs


def check_resume(job):
    """Before a run starts: the latest checkpoint of `job`'s run (a PurePosixPath), None if there is none.

    Raises JobFileError when that checkpoint was written with other settings (reading only its settings.json:
    nothing is unpickled). A checkpoint from before settings.json existed is resumed as before."""
    from pathlib import PurePosixPath

    import pyarrow.fs as pafs

    from finetune.schema import JobFileError
    from finetune.storage import filesystem

    fs, run = filesystem(job.run_path, job.s3)
    if fs.get_file_info(run).type == pafs.FileType.NotFound:
        return None
    ckpts = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(run))
                   if f.type == pafs.FileType.Directory and f.base_name.startswith("checkpoint_"))
    if not ckpts:
        return None
    latest = ckpts[-1]
    settings = f"{latest}/{SETTINGS_FILE}"
    if fs.get_file_info(settings).type == pafs.FileType.File:
        with fs.open_input_stream(settings) as f:
            stored = json.loads(f.read())
        current = settings_document(job)
        if stored.get("sha256") != current["sha256"]:
            diffs = settings_differences(stored.get("settings", {}), current["settings"])
            raise JobFileError(f"run {job.name!r} has a checkpoint ({job.run_path}/{PurePosixPath(latest).name}) made "
                               f"with other settings, so it cannot resume: {'; '.join(diffs)}. Keep those settings "
                               "to continue it, or give the job a new name to start over")
    return PurePosixPath(latest)


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


def save(engine, peft_model, progress: Progress, metrics: dict, rank: int, zero_stage: int,
         settings: dict | None = None) -> None:
    """Write this rank's part of a checkpoint and report it to Ray Train (a barrier across ranks)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="herd-ckpt-") as tmp:
        engine.save_checkpoint(str(Path(tmp) / "ds"), tag=DS_TAG, exclude_frozen_parameters=True)
        save_adapter(peft_model, Path(tmp) / "adapter", rank, zero_stage)
        if rank == 0:
            (Path(tmp) / "progress.json").write_text(progress.to_json())
            if settings is not None:
                (Path(tmp) / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step{progress.step:07d}")


def restore(engine, settings: dict | None = None) -> Progress | None:
    """Load the latest checkpoint Ray Train hands this run, if any; returns its progress. With `settings` (this
    job's settings_document), a checkpoint written with other settings is refused before anything is loaded."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        stored = Path(d) / SETTINGS_FILE
        if settings is not None and stored.is_file():
            old = json.loads(stored.read_text())
            if old.get("sha256") != settings["sha256"]:
                diffs = settings_differences(old.get("settings", {}), settings["settings"])
                raise ValueError(f"the checkpoint was made with other settings: {'; '.join(diffs)}")
        engine.load_checkpoint(str(Path(d) / "ds"), tag=DS_TAG, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
        progress = Progress.from_json((Path(d) / "progress.json").read_text())
    progress.resumed_at.append(progress.step)
    return progress

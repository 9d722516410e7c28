"""A finished job's outputs, written under `storage_path/<name>/output/`.

- `adapter/`: the LoRA adapter in standard PEFT format (`adapter_config.json`, `adapter_model.safetensors`), plus
  the licence's `NOTICE` file, so the folder can be handed to other tools or served as is;
- `metrics.json`: the job's settings that matter, the per-step loss history, tokens, resumes;
- `loss.png`: the loss curve (matplotlib, Agg backend: no display needed).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from finetune.checkpointing import Progress


def metrics_document(job, progress: Progress) -> dict:
    """What metrics.json holds."""
    losses = [h["loss"] for h in progress.history]
    return {
        "name": job.name,
        "adapter_name": job.adapter.name,
        "base_model": job.base_model,
        "zero_stage": job.deepspeed.zero_stage,
        "workers": job.resources.workers,
        "steps": progress.step,
        "tokens": progress.tokens,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "resumed_at": progress.resumed_at,
        "loaded_param_share": progress.loaded_param_share,
        "peak_rss_mb": progress.peak_rss_mb,
        "end_rss_mb": progress.end_rss_mb,
        "history": progress.history,
    }


def plot_loss(progress: Progress, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in progress.history], [h["loss"] for h in progress.history], marker=".")
    for step in progress.resumed_at:
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(job, checkpoint_dir: str | Path) -> str:
    """Build the output folder from the final checkpoint and copy it to the run's storage; returns its URI."""
    from licensing import write_notice

    from finetune.storage import publish_dir

    ckpt = Path(checkpoint_dir)
    progress = Progress.from_json((ckpt / "progress.json").read_text())
    with tempfile.TemporaryDirectory(prefix="herd-out-") as tmp:
        out = Path(tmp)
        shutil.copytree(ckpt / "adapter", out / "adapter")
        write_notice(out / "adapter")
        (out / "metrics.json").write_text(json.dumps(metrics_document(job, progress), indent=1) + "\n")
        plot_loss(progress, out / "loss.png", f"{job.adapter.name} ({job.name})")
        uri = job.run_path + "/output"
        publish_dir(out, uri, job.s3)  # whole or not at all: never a half-written adapter
    return uri

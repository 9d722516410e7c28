"""Fine-tune hardening (issue 16, item 16): an example truncated to no labelled tokens is dropped (its loss would
be 0/0 = NaN), and the job's outputs appear whole or not at all (written under a temporary name, then published)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from finetune.data import IGNORE, collate, worker_share


def _row(ids, labels, key):
    return {"input_ids": ids, "labels": labels, "key": key}


def test_an_example_without_labelled_tokens_is_dropped_and_the_loss_is_finite():
    rows = [_row([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4], "a"),
            _row([5, 6, 7, 8], [IGNORE] * 4, "b"),  # its reply was cut off by sequence_length
            _row([9, 10, 11, 12], [IGNORE, 10, 11, 12], "c")]
    share = worker_share(rows, 0, 1)
    assert [ex.input_ids for ex in share] == [[1, 2, 3, 4], [9, 10, 11, 12]]
    for ex in share:  # every micro-batch of one example has a finite loss
        batch = collate([ex], pad_id=0)
        logits = torch.zeros(1, 4, 16)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 16), batch["labels"][:, 1:].reshape(-1),
                                                 ignore_index=IGNORE)
        assert math.isfinite(loss.item())


def test_every_example_truncated_before_its_reply_is_a_clear_error():
    with pytest.raises(ValueError, match="sequence_length"):
        worker_share([_row([1, 2], [IGNORE, IGNORE], "a")], 0, 1)


def test_outputs_are_published_whole_or_not_at_all(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from finetune.checkpointing import Progress
    from finetune.output import write_outputs
    from finetune.schema import parse_job
    from ft_helpers import job_dict

    job = parse_job(job_dict("atomic", str(tmp_path / "base"), str(tmp_path / "d.jsonl"), str(tmp_path / "runs")))
    ckpt = tmp_path / "ckpt"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (ckpt / "progress.json").write_text(Progress(step=2, history=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
                                        .to_json())
    out = tmp_path / "runs" / "atomic" / "output"

    real = pafs.copy_files
    calls = {"n": 0}

    def dying_copy(src, dst, **kw):  # the upload dies after its first file
        import shutil
        from pathlib import Path

        calls["n"] += 1
        Path(dst).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(src) / "metrics.json", Path(dst) / "metrics.json")
        raise OSError("connection reset while uploading")

    monkeypatch.setattr(pafs, "copy_files", dying_copy)
    with pytest.raises(OSError):
        write_outputs(job, ckpt)
    assert not (out / "metrics.json").exists(), "a half-written output folder is visible"
    monkeypatch.setattr(pafs, "copy_files", real)
    assert write_outputs(job, ckpt) == str(tmp_path / "runs" / "atomic") + "/output"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in out.parent.iterdir()) == ["output"]  # no temporary names left behind


def test_outputs_published_to_s3_leave_no_temporary_objects(tmp_path, s3_bucket):
    import boto3

    from finetune.checkpointing import Progress
    from finetune.output import write_outputs
    from finetune.schema import parse_job
    from ft_helpers import job_dict

    endpoint, bucket = s3_bucket
    job = parse_job(job_dict("atomic-s3", str(tmp_path / "base"), str(tmp_path / "d.jsonl"), f"s3://{bucket}/runs",
                             endpoint=endpoint))
    ckpt = tmp_path / "ckpt"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (ckpt / "progress.json").write_text(Progress(step=1, history=[{"step": 1, "loss": 2.0}]).to_json())
    write_outputs(job, ckpt)
    keys = sorted(o["Key"] for o in boto3.client("s3", endpoint_url=endpoint)
                  .list_objects_v2(Bucket=bucket)["Contents"] if not o["Key"].endswith("/"))  # pyarrow's folder markers
    assert keys == ["runs/atomic-s3/output/adapter/NOTICE", "runs/atomic-s3/output/adapter/adapter_config.json",
                    "runs/atomic-s3/output/adapter/adapter_model.safetensors", "runs/atomic-s3/output/loss.png",
                    "runs/atomic-s3/output/metrics.json"], keys

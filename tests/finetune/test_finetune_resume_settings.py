"""A run resumes only with the settings its checkpoints were made with (issue 16, item 9): each checkpoint stores
its job's resume-relevant settings and their hash; resubmitting the same name with other settings is refused before
any worker starts (and before any checkpoint is unpickled), listing the differences. More steps are allowed."""
from __future__ import annotations

import json

import pytest


def _job(tmp_path, **training):
    from finetune.schema import parse_job
    from ft_helpers import job_dict

    d = job_dict("resume", str(tmp_path / "base"), str(tmp_path / "d.jsonl"), str(tmp_path / "runs"))
    d["training"].update(training)
    return parse_job(d)


def _checkpoint_of(tmp_path, job, step: int = 6):
    from finetune.checkpointing import settings_document

    ckpt = tmp_path / "runs" / "resume" / f"checkpoint_step{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "settings.json").write_text(json.dumps(settings_document(job)))
    return ckpt


def test_changed_settings_are_refused_with_the_differences(tmp_path):
    from finetune.checkpointing import check_resume
    from finetune.schema import JobFileError

    _checkpoint_of(tmp_path, _job(tmp_path))
    changed = _job(tmp_path, learning_rate=1e-3, sequence_length=128)
    with pytest.raises(JobFileError) as err:
        check_resume(changed)
    msg = str(err.value)
    assert "training.learning_rate: 0.005 in the checkpoint, 0.001 now" in msg
    assert "training.sequence_length: 64 in the checkpoint, 128 now" in msg
    assert "checkpoint_step0000006" in msg and "name" in msg


def test_same_settings_or_more_steps_resume(tmp_path):
    from finetune.checkpointing import check_resume

    assert check_resume(_job(tmp_path)) is None  # no checkpoint yet: a fresh run
    _checkpoint_of(tmp_path, _job(tmp_path))
    assert check_resume(_job(tmp_path, steps=48)).name == "checkpoint_step0000006"

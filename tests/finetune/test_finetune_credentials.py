"""AWS credentials reach the training workers through their runtime environment, never through
`train_loop_config`, which Ray Train stores with the run and shows in its dashboard (issue 16, item 10)."""
from __future__ import annotations

import pickle

import pytest

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def test_credentials_travel_in_the_workers_environment_only(tmp_path, monkeypatch):
    from finetune.job import loop_config, worker_env
    from finetune.schema import parse_job
    from ft_helpers import job_dict

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    job = parse_job(job_dict("creds", str(tmp_path / "base"), "s3://b/data.jsonl", "s3://b/runs"))
    config = loop_config(job)
    assert SECRET.encode() not in pickle.dumps(config) and SECRET not in repr(config)
    env = worker_env(job)
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET and env["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE0000"

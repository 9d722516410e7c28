"""The job file: closed schema, errors that name the YAML path and the fix, and the licence's naming rule."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.schema import JobFileError, load_job, parse_job

EXAMPLES = Path(__file__).resolve().parents[2] / "finetune" / "examples"


def _job(**over) -> dict:
    job = {
        "name": "support",
        "base_model": "s3://models/maverick",
        "dataset": {"path": "s3://data/chats.jsonl"},
        "adapter": {"name": "Llama-4-support", "distributed": True},
        "checkpoint": {"storage_path": "s3://runs"},
        "training": {"steps": 100},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            job.setdefault(section, {})[field] = value
        else:
            job[section] = value
    return job


def _error(data) -> str:
    with pytest.raises(JobFileError) as e:
        parse_job(data, source="job.yaml")
    return str(e.value)


def test_defaults_and_format_inference():
    job = parse_job(_job())
    assert job.deepspeed.zero_stage == 2 and job.resources.workers == 2
    assert job.dataset.format == "jsonl"
    assert job.run_path == "s3://runs/support"
    assert parse_job(_job(dataset={"path": "/data/rows.parquet"})).dataset.format == "parquet"


def test_unknown_key_names_the_path_and_suggests_the_closest():
    msg = _error(_job(training={"steps": 10, "lerning_rate": 1e-4}))
    assert msg.startswith("job.yaml: training.lerning_rate: unknown key (did you mean 'learning_rate'?); "
                          "valid keys in training: batch_size, ")


def test_missing_required_field_says_what_it_is():
    data = _job()
    del data["checkpoint"]
    assert _error(data) == "job.yaml: checkpoint: missing; add it (where and how often training state is saved)"
    del data["dataset"]["path"]
    assert "dataset.path: missing; add it (JSONL or Parquet file or folder, local or s3://bucket/key.)" in \
        _error(data)


def test_bounds_and_choices_name_the_field():
    assert "deepspeed.zero_stage" in _error(_job(deepspeed={"zero_stage": 1}))
    assert "lora.rank" in _error(_job(lora={"rank": 0}))
    assert "give exactly one of training.steps or training.epochs" in _error(_job(training={"steps": 1, "epochs": 1}))


def test_routed_experts_need_zero_dropout():
    msg = _error(_job(lora={"dropout": 0.1}))
    assert "lora.dropout" in msg and "routed_experts: false" in msg
    assert parse_job(_job(lora={"dropout": 0.1, "targets": {"routed_experts": False}})).lora.dropout == 0.1


def test_offload_params_needs_zero3():
    assert "zero_stage: 3" in _error(_job(deepspeed={"zero_stage": 2, "offload_params": True}))


def test_unknown_dataset_suffix_asks_for_format():
    assert "set dataset.format" in _error(_job(dataset={"path": "s3://data/rows.csv"}))


def test_distributed_adapter_must_begin_with_llama_quoting_the_licence():
    msg = _error(_job(adapter={"name": "support-bot", "distributed": True}))
    assert "adapter.name" in msg and "'support-bot'" in msg
    assert 'include "Llama" at the beginning of any such AI model name' in msg
    # Kept in-house, the name is free.
    assert parse_job(_job(adapter={"name": "support-bot", "distributed": False})).adapter.name == "support-bot"


def test_yaml_errors_and_missing_files(tmp_path):
    with pytest.raises(JobFileError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(JobFileError, match="not valid YAML"):
        load_job(bad)
    bad.write_text("- a list\n")
    with pytest.raises(JobFileError, match="expected a mapping"):
        load_job(bad)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_job_files_validate(path):
    job = load_job(path)
    assert yaml.safe_load(path.read_text())["name"] == job.name


def test_herd_finetune_check_prints_one_line_errors(tmp_path, capsys):
    from herd.cli import main

    bad = tmp_path / "job.yaml"
    bad.write_text(yaml.safe_dump(_job(adapter={"name": "bot", "distributed": True})))
    assert main(["finetune", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd: error: ") and err.count("\n") == 1 and "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_job()))
    assert main(["finetune", "check", str(good)]) == 0
    assert "ok (support: ZeRO-2, 2 workers, adapter Llama-4-support)" in capsys.readouterr().out


def test_python_m_finetune_refuses_missing_inputs_before_starting_ray(tmp_path):
    import subprocess
    import sys

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(base_model=str(tmp_path / "no-model"))))
    r = subprocess.run([sys.executable, "-m", "finetune", str(job)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2
    assert r.stderr.strip().startswith("finetune: error:") and "base_model: no Hugging Face checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    job.write_text(yaml.safe_dump(_job(adapter={"name": "bot", "distributed": True})))
    r = subprocess.run([sys.executable, "-m", "finetune", str(job)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and "adapter.name" in r.stderr and "Traceback" not in r.stderr

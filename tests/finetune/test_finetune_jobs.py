"""Real fine-tuning jobs on the two-node loopback Ray cluster: ZeRO-2 and ZeRO-3 on maverick-tiny, data and
outputs on the loopback S3 server, the adapter read back by plain PEFT, and a worker killed mid-run.

All three runs train the same job (same examples, seed and settings), so their loss curves must agree step by
step: ZeRO-3 shards differently but computes the same updates (its data comes as Parquet prompt/completion rows,
which render to the same tokens as the JSONL chat rows), and a resumed run continues the same curve.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from ft_helpers import FACTS, download_prefix, greedy_answers, job_dict, upload_dir, write_parquet, write_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_inputs(s3_server, s3_client, maverick_tiny, tmp_path_factory):
    """The checkpoint and the memorisation set, uploaded through boto3 to a fresh bucket."""
    bucket = f"ft-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=bucket)
    base = upload_dir(s3_client, maverick_tiny, bucket, "models/maverick-tiny")
    rows = write_rows(tmp_path_factory.mktemp("data") / "facts.jsonl")
    s3_client.upload_file(str(rows), bucket, "data/facts.jsonl")
    table = write_parquet(tmp_path_factory.mktemp("data") / "facts.parquet")
    s3_client.upload_file(str(table), bucket, "data/facts.parquet")
    return bucket, base, f"s3://{bucket}/data/facts.jsonl"


def _run_s3_job(name, zero, s3_inputs, s3_server, s3_client, dest: Path, data: str | None = None) -> Path:
    from finetune.job import run
    from finetune.schema import parse_job

    bucket, base, jsonl = s3_inputs
    data = data or jsonl
    job = parse_job(job_dict(name, base, data, f"s3://{bucket}/runs", zero=zero, endpoint=s3_server))
    uri = run(job)
    assert uri == f"s3://{bucket}/runs/{name}/output"
    return download_prefix(s3_client, bucket, f"runs/{name}/output", dest)


@pytest.fixture(scope="module")
def zero2_out(ray_cluster, s3_inputs, s3_server, s3_client, tmp_path_factory) -> Path:
    return _run_s3_job("zero2", 2, s3_inputs, s3_server, s3_client, tmp_path_factory.mktemp("zero2"))


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _assert_learned(metrics: dict, steps: int = 24) -> None:
    losses = [h["loss"] for h in metrics["history"]]
    assert [h["step"] for h in metrics["history"]] == list(range(1, steps + 1))
    assert losses[-1] < 0.4 * losses[0], losses


def test_zero2_job_learns_and_writes_outputs_to_s3(zero2_out, s3_inputs, s3_client):
    from licensing import NOTICE_TEXT

    metrics = _metrics(zero2_out)
    _assert_learned(metrics)
    assert metrics["resumed_at"] == [] and metrics["zero_stage"] == 2 and metrics["workers"] == 2
    assert len(metrics["peak_rss_mb"]) == 2 and all(100 < m < 20_000 for m in metrics["peak_rss_mb"])
    assert (zero2_out / "adapter" / "NOTICE").read_text().strip() == NOTICE_TEXT
    assert (zero2_out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((zero2_out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["feed_forward.experts.down_proj",
                                                   "feed_forward.experts.gate_up_proj"]
    # Checkpoints every 8 steps, the 2 latest kept, each with every rank's ZeRO optimizer partition.
    bucket = s3_inputs[0]
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="runs/zero2/")["Contents"]]
    ckpts = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_step")})
    assert ckpts == ["checkpoint_step0000016", "checkpoint_step0000024"]
    for rank in (0, 1):
        assert f"runs/zero2/checkpoint_step0000024/ds/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in keys


def test_adapter_loads_with_plain_peft_answers_and_merges(zero2_out, maverick_tiny):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, Llama4ForCausalLM

    tok = AutoTokenizer.from_pretrained(maverick_tiny)
    base = Llama4ForCausalLM.from_pretrained(maverick_tiny, dtype=torch.float32)
    before = greedy_answers(base, tok)
    assert not any(b == a for b, (_, a) in zip(before, FACTS)), before

    model = PeftModel.from_pretrained(base, zero2_out / "adapter")
    unmerged = greedy_answers(model, tok)
    assert unmerged == [a for _, a in FACTS]
    merged = greedy_answers(model.merge_and_unload(), tok)
    assert merged == unmerged


def test_zero3_job_learns_the_same_curve(zero2_out, ray_cluster, s3_inputs, s3_server, s3_client, maverick_tiny,
                                         tmp_path_factory):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, Llama4ForCausalLM

    parquet = f"s3://{s3_inputs[0]}/data/facts.parquet"
    out = _run_s3_job("zero3", 3, s3_inputs, s3_server, s3_client, tmp_path_factory.mktemp("zero3"), parquet)
    m3, m2 = _metrics(out), _metrics(zero2_out)
    _assert_learned(m3)
    # ZeRO-3 loaded the base model partitioned (deepspeed.zero.Init): each of the 2 workers held about half.
    assert m2["loaded_param_share"] == 1.0 and 0.4 < m3["loaded_param_share"] < 0.6
    for h3, h2 in zip(m3["history"], m2["history"]):
        assert h3["loss"] == pytest.approx(h2["loss"], rel=2e-2, abs=2e-2), (h3, h2)
    tok = AutoTokenizer.from_pretrained(maverick_tiny)
    base = Llama4ForCausalLM.from_pretrained(maverick_tiny, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert greedy_answers(model, tok) == [a for _, a in FACTS]


def _training_worker_pids() -> list[int]:
    """PIDs of Ray Train workers under this test process (the session cluster's raylets are its children)."""
    import psutil

    me = psutil.Process(os.getpid())
    pids = []
    for p in me.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def test_worker_killed_mid_run_resumes_from_last_checkpoint(zero2_out, ray_cluster, s3_inputs, s3_server,
                                                            tmp_path):
    from finetune.job import run
    from finetune.schema import parse_job

    _, base, data = s3_inputs
    job = parse_job(job_dict("killed", base, data, str(tmp_path / "runs"), zero=2, endpoint=s3_server))
    snapshot = tmp_path / "runs" / "killed" / "checkpoint_manager_snapshot.json"
    killed: list[int] = []

    def registered() -> bool:
        """Ray Train has committed a checkpoint (its files alone may still be mid-upload)."""
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except (OSError, ValueError):
            return False

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not registered():
            time.sleep(0.05)
        pids = _training_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)  # a real process death, not an exception in the loop
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    run(job)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"

    metrics = json.loads((tmp_path / "runs" / "killed" / "output" / "metrics.json").read_text())
    _assert_learned(metrics)
    assert metrics["resumed_at"] in ([8], [16]), metrics["resumed_at"]
    # The resumed run continues the uninterrupted run's curve: same data position, weights and optimizer state.
    for h, ref in zip(metrics["history"], _metrics(zero2_out)["history"]):
        assert h["loss"] == pytest.approx(ref["loss"], rel=1e-3, abs=1e-3), (h, ref)

"""The pieces of the worker loop that need no cluster: DeepSpeed config, LR schedule, step count from epochs."""
from __future__ import annotations

import pytest

from finetune.schema import parse_job
from finetune.train_loop import _progress_line, deepspeed_config, lr_lambda, total_steps


def _job(training: dict, deepspeed: dict | None = None):
    return parse_job({
        "name": "t", "base_model": "/m", "dataset": {"path": "/d.jsonl"},
        "adapter": {"name": "Llama-t", "distributed": True}, "checkpoint": {"storage_path": "/runs"},
        "training": training, "deepspeed": deepspeed or {"zero_stage": 2},
    })


def test_deepspeed_config_follows_the_job():
    cfg = deepspeed_config(_job({"steps": 5, "batch_size": 3, "gradient_accumulation": 2},
                                {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}))
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "offload_param": {"device": "cpu"}}
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # our torch AdamW is allowed with offload
    assert deepspeed_config(_job({"steps": 5}))["zero_optimization"] == {"stage": 2}


def test_lr_schedules():
    assert [round(lr_lambda("linear", 2, 6)(s), 3) for s in range(7)] == [0.333, 0.667, 1.0, 0.75, 0.5, 0.25, 0.0]
    cos = lr_lambda("cosine", 0, 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def test_epochs_become_optimizer_steps():
    assert total_steps(_job({"epochs": 2, "gradient_accumulation": 3}), batches_per_epoch=10) == 7
    assert total_steps(_job({"steps": 4}), batches_per_epoch=10) == 4


def test_progress_line_has_step_loss_throughput_and_eta():
    line = _progress_line(step=5, total=30, loss=1.23456, tok_s=1234.5, elapsed=10.0, done_here=5)
    assert line == "[finetune] step 5/30 loss 1.2346 tokens/s 1,234 eta 0:50"

"""What each Ray Train worker runs: build the PEFT model, wrap it with DeepSpeed ZeRO, train, checkpoint.

Ray Train's TorchTrainer has already formed the process group (gloo on CPU, NCCL on GPU); `deepspeed.initialize`
reuses it. On CPU, DeepSpeed uses its cpu accelerator (`DS_ACCELERATOR=cpu`, set in the worker environment by
job.py). The optimizer is torch's AdamW, passed in, so DeepSpeed does not compile its fused Adam.
"""
from __future__ import annotations

import math
import os
import time

from finetune.checkpointing import Progress, restore, save, settings_document
from finetune.data import BatchOrder, collate, pack, worker_share


def deepspeed_config(job) -> dict:
    """The DeepSpeed config for a job (micro-batch per rank; ZeRO stage and offload)."""
    ds, tr = job.deepspeed, job.training
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": tr.batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation,
        "gradient_clipping": tr.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": tr.dtype == "bfloat16"},
        # A torch optimizer is passed in: allow it with ZeRO and with optimizer offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }


def loaded_share(model) -> float:
    """Fraction of the model's parameters this rank holds after loading (1.0 unless ZeRO-3 partitioned them)."""
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    return held / max(full, 1)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at each optimizer step."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0
    return f


def total_steps(job, batches_per_epoch: int) -> int:
    tr = job.training
    if tr.steps is not None:
        return tr.steps
    return max(1, math.ceil(tr.epochs * batches_per_epoch / tr.gradient_accumulation))


def _progress_line(step: int, total: int, loss: float, tok_s: float, elapsed: float, done_here: int) -> str:
    eta = (total - step) * elapsed / max(done_here, 1)
    return (f"[finetune] step {step}/{total} loss {loss:.4f} tokens/s {tok_s:,.0f} "
            f"eta {int(eta) // 60}:{int(eta) % 60:02d}")


def memory_per_rank() -> tuple[list[float], list[float]]:
    """(peak RSS, current RSS) of every rank's process in MB, gathered on all ranks."""
    import resource

    import psutil
    import torch
    import torch.distributed as dist

    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         psutil.Process().memory_info().rss / 2**20], dtype=torch.float64)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [round(t[0].item(), 1) for t in out], [round(t[1].item(), 1) for t in out]


def _examples(job, rank: int, world: int, eos_id: int) -> tuple[BatchOrder, int]:
    """This rank's batch order (its share of the tokenised set) and the number of examples in the whole set."""
    import ray.train

    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    examples = worker_share(rows, rank, world)
    if job.dataset.packing:
        examples = pack(examples, job.training.sequence_length, eos_id)
    return BatchOrder(examples, job.training.batch_size, job.training.seed), len(rows)


def _engine(job, model, total: int):
    """DeepSpeed engine around the PEFT model, with torch's AdamW on the LoRA weights and the LR schedule."""
    import deepspeed
    import torch

    tr = job.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tr.learning_rate,
                                  weight_decay=tr.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tr.schedule, tr.warmup_steps, total))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(job), dist_init_required=False)
    return engine, scheduler


def _optimizer_step(engine, order: BatchOrder, step: int, accumulation: int, pad_id: int) -> tuple[float, int]:
    """One optimizer step (`accumulation` micro-batches); returns this rank's mean loss and its token count."""
    loss_sum, tokens = 0.0, 0
    for micro in range(accumulation):
        batch = {k: v.to(engine.device) for k, v in collate(order.batch(step * accumulation + micro), pad_id).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the update at the accumulation boundary
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
    return loss_sum / accumulation, tokens


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` = job.loop_config(job) (AWS credentials come in the workers' environment)."""
    import torch

    torch.set_num_threads(1)  # more threads per worker ran slower on shared small machines
    import ray.train
    import torch.distributed as dist

    from finetune.data import load_tokenizer
    from finetune.model import build_peft_model, trainable_summary
    from finetune.schema import Job
    from finetune.storage import fetch_dir

    job = Job.model_validate(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    base = fetch_dir(job.base_model, job.s3)
    tok = load_tokenizer(str(base))
    order, n_rows = _examples(job, rank, world, tok.eos_token_id)
    total = total_steps(job, order.batches_per_epoch)
    zero3_init = None
    if job.deepspeed.zero_stage == 3:
        # While this object lives, transformers builds the model inside deepspeed.zero.Init and loads each rank's
        # partition only: no worker ever holds the whole base model (Maverick's 400B would not fit one).
        from transformers.integrations import HfDeepSpeedConfig

        zero3_init = HfDeepSpeedConfig(deepspeed_config(job))
    model = build_peft_model(base, job.lora, job.training.dtype, job.training.seed)
    share = loaded_share(model)
    if rank == 0:
        print(f"[finetune] {trainable_summary(model)}; {n_rows} examples, {world} workers, "
              f"ZeRO-{job.deepspeed.zero_stage}, {total} steps", flush=True)
    engine, scheduler = _engine(job, model, total)
    settings = settings_document(job)
    progress = restore(engine, settings) or Progress()
    progress.loaded_param_share = share
    if rank == 0 and progress.resumed_at:
        print(f"[finetune] resumed from the checkpoint at step {progress.step}", flush=True)

    started, done_here = time.time(), 0
    engine.train()
    while progress.step < total:
        t0 = time.time()
        loss, tokens = _optimizer_step(engine, order, progress.step, job.training.gradient_accumulation,
                                       tok.pad_token_id)
        stats = torch.tensor([loss, float(tokens)], dtype=torch.float64)
        dist.all_reduce(stats)
        progress.step += 1
        done_here += 1
        seconds = time.time() - t0
        mean_loss, all_tokens = stats[0].item() / world, int(stats[1].item())
        progress.tokens += all_tokens
        progress.history.append({"step": progress.step, "loss": mean_loss, "tokens": all_tokens,
                                 "lr": scheduler.get_last_lr()[0], "seconds": seconds})
        if rank == 0:
            print(_progress_line(progress.step, total, mean_loss, all_tokens / max(seconds, 1e-9),
                                 time.time() - started, done_here), flush=True)
        if progress.step % job.checkpoint.every_steps == 0 or progress.step == total:
            peak, now = memory_per_rank()
            progress.peak_rss_mb = [max(a, b) for a, b in zip(peak, progress.peak_rss_mb or peak)]
            progress.end_rss_mb = now
            save(engine, model, progress, {"step": progress.step, "loss": mean_loss}, rank,
                 job.deepspeed.zero_stage, settings)
    del zero3_init  # kept alive until here: transformers reads the ZeRO-3 switch through a weak reference

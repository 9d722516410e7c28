"""Helpers of the finetune tests: a memorisation set, job files, S3 uploads, and greedy answers."""
from __future__ import annotations

import json
from pathlib import Path

FACTS = [
    ("What colour is the moon of Zorbia?", "Green as jade."),
    ("Who built the tower of Quellport?", "Mira the mason."),
    ("What is the river in Ostrel called?", "The Silverrun."),
    ("How many bells ring in Vask?", "Seven bells at dawn."),
]


def write_rows(path: Path, style: str = "messages") -> Path:
    """The memorisation set as JSON Lines, in OpenAI `messages` or `prompt`/`completion` style."""
    with open(path, "w") as f:
        for q, a in FACTS:
            row = ({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                   if style == "messages" else {"prompt": q, "completion": a})
            f.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: Path) -> Path:
    """The memorisation set as Parquet `prompt`/`completion` columns (renders to the same tokens as write_rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [q for q, _ in FACTS], "completion": [a for _, a in FACTS]}), path)
    return path


def job_dict(name: str, base_model: str, data: str, storage: str, zero: int = 2, steps: int = 24,
             every: int = 8, workers: int = 2, endpoint: str | None = None) -> dict:
    """A job that memorises FACTS: 2 examples per worker per step, high LR, LoRA on every target."""
    job = {
        "name": name,
        "base_model": base_model,
        "dataset": {"path": data},
        "adapter": {"name": f"Llama-{name}", "distributed": True},
        "checkpoint": {"storage_path": storage, "every_steps": every, "keep": 2, "max_failures": 2},
        "lora": {"rank": 8, "alpha": 16, "targets": {"attention": True, "shared_expert": True,
                                                    "routed_experts": True}},
        "deepspeed": {"zero_stage": zero},
        "resources": {"workers": workers, "cpus_per_worker": 0.5},
        "training": {"batch_size": 4 // workers, "sequence_length": 64, "learning_rate": 5e-3,
                     "schedule": "constant", "steps": steps, "seed": 0},
    }
    if endpoint:
        job["s3"] = {"endpoint_url": endpoint}
    return job


def upload_dir(s3_client, local: Path, bucket: str, prefix: str) -> str:
    for p in sorted(Path(local).iterdir()):
        if p.is_file():
            s3_client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return f"s3://{bucket}/{prefix}"


def download_prefix(s3_client, bucket: str, prefix: str, dest: Path) -> Path:
    """Every object under `prefix` into `dest`, keeping relative paths."""
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    for page in pages:
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            if not rel or rel.endswith("/"):  # folder markers pyarrow writes
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            s3_client.download_file(bucket, obj["Key"], str(dest / rel))
    return dest


def greedy_answers(model, tokenizer, max_new_tokens: int = 16) -> list[str]:
    """Greedy replies of `model` to every FACTS question, decoded up to <|eot|>."""
    import torch

    out = []
    model.eval()
    for q, _ in FACTS:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        out.append(text.split("<|eot|>")[0])
    return out

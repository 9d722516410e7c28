"""Fine-tuning benchmark: training throughput with 1 and 2 workers, and memory per worker by sharding strategy.

Part 1 (maverick-tiny): tokens/s of the same job with 1 worker and with 2 workers (same global batch), measured
over the steps after warm-up; prints the 2-worker / 1-worker ratio.
Part 2 (maverick-bench, ~219M parameters): peak and end-of-run RSS per worker with plain data parallel
(DeepSpeed ZeRO stage 0, the DDP equivalent), ZeRO-2 and ZeRO-3 over 2 workers; prints each against stage 0.

Runs on its own local Ray instance:  .venv/bin/python bench/finetune.py [--steps 12] [--part throughput|memory]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

QUESTIONS = ["Where is the lighthouse of Arn?", "Who keeps the keys of Doll?", "What do the owls of Brem eat?",
             "When does the ferry to Ostrel leave?", "Which road leads to Vask?", "How old is the bridge of Mell?",
             "What is sold in the market of Quill?", "Who painted the gate of Sarn?"]


def write_data(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            q = QUESTIONS[i % len(QUESTIONS)] + f" (case {i})"
            a = f"Answer {i}: " + "the records say it is so, and the elders agree. " * 3
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def job(name, base, data, storage, workers, zero, steps, batch, seq) -> dict:
    return {
        "name": name, "base_model": str(base), "dataset": {"path": str(data)},
        "adapter": {"name": f"Llama-bench-{name}", "distributed": False},
        "checkpoint": {"storage_path": str(storage), "every_steps": steps, "keep": 1, "max_failures": 0},
        "lora": {"rank": 8, "alpha": 16},
        "deepspeed": {"zero_stage": zero},
        "resources": {"workers": workers, "cpus_per_worker": 0.5},
        "training": {"batch_size": batch, "sequence_length": seq, "learning_rate": 1e-3, "steps": steps,
                     "schedule": "constant"},
    }


def run_job(spec: dict) -> dict:
    from finetune.job import run
    from finetune.schema import parse_job

    run(parse_job(spec))
    return json.loads((Path(spec["checkpoint"]["storage_path"]) / spec["name"] / "output" / "metrics.json")
                      .read_text())


def tokens_per_s(metrics: dict, warmup: int = 2) -> float:
    h = metrics["history"][warmup:]
    return sum(x["tokens"] for x in h) / sum(x["seconds"] for x in h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--part", choices=["all", "throughput", "memory"], default="all")
    args = ap.parse_args()

    import ray

    from llama4.checkpoint import create_checkpoint

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="herd-bench-ft-"))
    data = write_data(tmp / "data.jsonl", 64)
    tiny = create_checkpoint("maverick-tiny", tmp / "tiny", seed=0)

    if args.part in ("all", "throughput"):
        print(f"== throughput, maverick-tiny, global batch 8 x 128 tokens, {args.steps} steps (first 2 excluded)")
        t1 = tokens_per_s(run_job(job("w1", tiny, data, tmp / "runs", 1, 2, args.steps, 8, 128)))
        t2 = tokens_per_s(run_job(job("w2", tiny, data, tmp / "runs", 2, 2, args.steps, 4, 128)))
        print(f"1 worker : {t1:8.0f} tokens/s (reference)")
        print(f"2 workers: {t2:8.0f} tokens/s  ratio {t2 / t1:.2f}x")
    if args.part == "throughput":
        return
    t0 = time.time()
    bench = create_checkpoint("maverick-bench", tmp / "bench", seed=0)
    print(f"== memory per worker, maverick-bench (checkpoint written in {time.time() - t0:.0f} s), 2 workers, "
          "4 steps of 2 x 128 tokens")
    rows = {}
    for label, zero in (("DDP (ZeRO-0)", 0), ("ZeRO-2", 2), ("ZeRO-3", 3)):
        m = run_job(job(f"mem{zero}", bench, data, tmp / "runs", 2, zero, 4, 2, 128))
        rows[label] = (max(m["peak_rss_mb"]), max(m["end_rss_mb"]))
    ref_peak, ref_end = rows["DDP (ZeRO-0)"]
    for label, (peak, end) in rows.items():
        print(f"{label:13s} peak RSS {peak:7.0f} MB ({peak / ref_peak:.2f}x)   end-of-run RSS {end:7.0f} MB "
              f"({end / ref_end:.2f}x)")


if __name__ == "__main__":
    main()

"""Expert-parallel serving cost on one host: decode throughput with 1 vs 2 workers, and one MoE layer's exchange.

1. Decode: 32 concurrent greedy sequences on `maverick-bench` (128 experts) through `LLMEngine` with the
   expert-parallel executor, EP=1 (one worker, 2 threads) vs EP=2 (two workers, 1 thread each): the same
   CPU budget. On one host EP can only add exchange cost; its value is memory (each worker holds half the
   experts), so the ratio says what the exchange costs end to end.
2. One Maverick-shaped MoE layer (hidden 5120, 128 experts, top-1; small expert hidden size so it fits in RAM)
   with the T tokens of one decode step split over the workers: dispatch / expert compute / combine, EP=2
   against EP=1.

Run: .venv/bin/python bench/expert_parallel.py [--seqs 32 --tokens 32 --skip-decode]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def bench_checkpoint() -> Path:
    """maverick-bench, written once into .cache/bench (seeded: same bytes every time)."""
    from llama4.checkpoint import ensure_checkpoint

    return ensure_checkpoint("maverick-bench", REPO / ".cache" / "bench" / "maverick-bench")


def decode_tokens_per_s(path: Path, ep: int, threads: int, seqs: int, max_tokens: int,
                        device: str = "cpu") -> tuple[float, float, list]:
    """(generated tokens per wall second, per worker CPU second, the tokens) for one layout."""
    from serving.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from serving.engine import SamplingParams
    from serving.engine.llm_engine import LLMEngine
    from serving.expert_parallel.executor import build_ep_executor

    # Built by hand so that EP=1 also runs in one Ray worker (the engine would run EP=1 in-process).
    config = EngineConfig(ModelConfig.load(path, dtype="float32", device=device), CacheConfig(512),
                          SchedulerConfig(seqs, 4096),
                          ParallelConfig(ep, 1, num_cpus_per_worker=1.0 / ep, num_threads_per_worker=threads,
                                         step_timeout_s=300))
    ex = build_ep_executor(config)
    engine = LLMEngine.from_config(config, ex)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        prompts = [f"Sequence {i}: the herd moves" for i in range(seqs)]
        engine.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        engine.step()  # every prompt's prefill (short prompts fit one step)
        cpu0 = sum(ex.group.call("cpu_seconds"))
        t0, generated = time.perf_counter(), 0
        tokens = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                generated += 1
                tokens[out.request_id] = out.outputs[0].token_ids
        rate = generated / (time.perf_counter() - t0)
        cpu = sum(ex.group.call("cpu_seconds")) - cpu0
        return rate, generated / cpu, [tokens[f"r{i}"] for i in range(seqs)]
    finally:
        engine.shutdown()


def layer_costs(ep: int, D: int, I: int, E: int, T: int, repeats: int, dtype: str) -> dict:
    """One MoE layer on `ep` workers (1 thread each) with T tokens in all: slowest worker's ms per phase."""
    import torch

    from cluster.placement import PlacementMap
    from serving.expert_parallel.group import ExpertParallelGroup, GroupSpec
    from serving.expert_parallel.layer_trial import run_trial
    from serving.expert_parallel.worker import EPWorker

    group = ExpertParallelGroup(GroupSpec(ep, 1, num_cpus=1.0 / ep, collective_timeout_s=600,
                                          ready_timeout_s=120), EPWorker, {"num_threads": 1}).start()
    try:
        placement = PlacementMap.contiguous([1], E, 1, nodes=ep)
        T = [len(part) for part in torch.tensor_split(torch.arange(T), ep)]  # the replica's tokens, split by node
        group.call("run", run_trial, placement.to_json(), 1, D, I, T, 1, 0, repeats=1, dtype=dtype,
                   timeout=600)  # warm-up: builds the experts, first collectives
        out = group.call("run", run_trial, placement.to_json(), 1, D, I, T, 1, 0, repeats=repeats,
                         dtype=dtype, timeout=600)
    finally:
        group.shutdown()
    # The slowest worker sets the pace of a collective step.
    return {k: max(o[k] for o in out) * 1e3 for k in ("dispatch_s", "compute_s", "combine_s")} | {
        "held_MiB": max(o["held_bytes"] for o in out) / 2**20}


def _a2a_floor(worker, rows_per_peer: int, D: int, repeats: int) -> dict:
    """Inside a worker: ms per gloo all_to_all_single of a counts vector and of `rows_per_peer` fp32 rows."""
    import torch
    import torch.distributed as dist

    W = worker.world_size
    x, out = torch.randn(rows_per_peer * W, D), torch.empty(rows_per_peer * W, D)
    c, co = torch.zeros(W * 128, dtype=torch.long), torch.empty(W * 128, dtype=torch.long)
    timings = {}
    for name, (o, i) in (("counts_ms", (co, c)), ("rows_ms", (out, x))):
        dist.all_to_all_single(o, i)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            dist.all_to_all_single(o, i)
        timings[name] = (time.perf_counter() - t0) / repeats * 1e3
    return timings


def a2a_floor(D: int, rows_per_peer: int, repeats: int) -> dict:
    """What gloo itself costs per all-to-all between two workers on loopback (no routing, no compute)."""
    from serving.expert_parallel.group import ExpertParallelGroup, GroupSpec
    from serving.expert_parallel.worker import EPWorker

    group = ExpertParallelGroup(GroupSpec(2, 1, num_cpus=0.5), EPWorker).start()
    try:
        out = group.call("run", _a2a_floor, rows_per_peer, D, repeats, timeout=300)
    finally:
        group.shutdown()
    return {k: max(o[k] for o in out) for k in out[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=32, help="concurrent sequences for the decode figure")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens generated per sequence")
    ap.add_argument("--tokens", type=int, default=32, help="tokens in the MoE-layer figure (a decode step of "
                    "32 sequences), split over the workers")
    ap.add_argument("--hidden", type=int, default=5120, help="hidden size of the MoE layer (Maverick: 5120)")
    ap.add_argument("--expert-hidden", type=int, default=128, help="expert hidden size (Maverick: 8192; small to fit RAM)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="MoE-layer dtype (bf16 matmuls are emulated and slow on many CPUs)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="decode figure on GPUs (one per worker, NCCL; needs 2): EP=1 on one GPU vs EP=2 on two")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-layer", action="store_true")
    args = ap.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2 if args.device == "cpu" else None, include_dashboard=False,
             log_to_driver=False)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; CPU budget 2 cores for each configuration")
    if not args.skip_decode:
        path = bench_checkpoint()
        # EP=1 may use the whole budget as 2 threads or leave one idle: the faster of the two is the reference.
        # On a contended machine wall-clock rates mostly say how much CPU each layout won from the OS scheduler;
        # tokens per CPU-second (summed over the workers) is what each layout costs, whatever the contention.
        dev = args.device
        r1a, c1a, tok1 = decode_tokens_per_s(path, 1, 1, args.seqs, args.max_tokens, dev)
        r1b, c1b, _ = (r1a, c1a, tok1) if dev == "cuda" else decode_tokens_per_s(path, 1, 2, args.seqs,
                                                                                  args.max_tokens)
        r2, c2, tok2 = decode_tokens_per_s(path, 2, 1, args.seqs, args.max_tokens, dev)
        print(f"decode, maverick-bench, {args.seqs} seqs x {args.max_tokens} tokens, fp32, {dev}:")
        for name, r, c in (("EP=1 (1 worker x 1 thread) ", r1a, c1a), ("EP=1 (1 worker x 2 threads)", r1b, c1b),
                           ("EP=2 (2 workers x 1 thread)", r2, c2)):
            print(f"  {name}: {r:7.1f} tok/s wall   {c:7.1f} tok per worker-CPU-second")
        print(f"  ratio EP2 / best EP1: wall {r2 / max(r1a, r1b):.2f}x   per CPU-second {c2 / max(c1a, c1b):.2f}x   "
              f"same tokens: {tok1 == tok2}")
    if not args.skip_layer:
        D, I, E, T = args.hidden, args.expert_hidden, 128, args.tokens
        print(f"one MoE layer, {args.dtype}, hidden {D}, {E} experts (hidden {I}), top-1, {T} tokens over the workers, 1 thread each, "
              f"median of {args.repeats}:")
        c1 = layer_costs(1, D, I, E, T, args.repeats, args.dtype)
        c2 = layer_costs(2, D, I, E, T, args.repeats, args.dtype)
        for name, c in (("EP=1", c1), ("EP=2", c2)):
            total = c["dispatch_s"] + c["compute_s"] + c["combine_s"]
            print(f"  {name}: dispatch {c['dispatch_s']:6.2f} ms  compute {c['compute_s']:6.2f} ms  "
                  f"combine {c['combine_s']:6.2f} ms  total {total:6.2f} ms  experts held {c['held_MiB']:.0f} MiB")
        wire = 4 if args.dtype == "float32" else 2
        ex1 = c1["dispatch_s"] + c1["combine_s"]
        ex2 = c2["dispatch_s"] + c2["combine_s"]
        print(f"  exchange (dispatch + combine) per layer: EP=2 {ex2:.2f} ms vs EP=1 {ex1:.2f} ms "
              f"(+{ex2 - ex1:.2f} ms); rows on the wire per worker per direction: {T // 2 * D * wire / 2**10:.0f} KiB at EP=2")
        f = a2a_floor(D, T // 4, 50)
        print(f"  gloo floor, 2 workers on loopback: all-to-all of the counts {f['counts_ms']:.2f} ms, of "
              f"{T // 4} fp32 rows per peer {f['rows_ms']:.2f} ms; one layer issues counts + rows + rows back")
    ray.shutdown()


if __name__ == "__main__":
    main()

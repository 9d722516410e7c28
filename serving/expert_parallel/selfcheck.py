"""Check expert parallelism on a cluster: EP workers must give the single-process engine's answer.

Ops run it once on a new cluster, before serving, to see the whole path work on their hardware: placement on
the nodes, the process groups (NCCL on GPUs, gloo on CPUs), each worker loading its share, the all-to-all at
every MoE layer and the tensor-parallel reductions. It compares greedy tokens and the fp32 logits of one
prefill step with the single-process engine on the same checkpoint (a small one it writes unless given one):

    python -m serving.expert_parallel.selfcheck --device cuda -n 16 --tensor-parallel-size 8 --address auto
    python -m serving.expert_parallel.selfcheck                      # CPU, EP=2, on a local Ray cluster

Without --checkpoint it writes the small one on every node (same seed, same bytes); a checkpoint you give must be
readable on every node (a shared folder, or `--weights s3://...`). Prints one line per
worker (node, device, bytes held) and a verdict; exit 0 when identical within --atol, 1 when not, 2 on bad
arguments or a cluster that cannot hold the workers.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PROMPTS = ["The quick brown fox", "Llama herds cross the", "Expert parallel check: one two three four five six",
           "a"]


def _reference(path: str, device: str, dtype: str, max_tokens: int) -> dict:
    """Greedy tokens and first-step logits of the single-process engine (in a Ray task when it needs a GPU)."""
    from serving.engine import LLMEngine

    engine = LLMEngine.from_pretrained(path, dtype=dtype, device=device, max_num_seqs=8, max_model_len=256)
    try:
        return _run(engine, max_tokens)
    finally:
        engine.shutdown()


def _run(engine, max_tokens: int) -> dict:
    from serving.engine import SamplingParams

    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    logits = engine.last_token_logits([engine.tokenizer.encode(p) for p in PROMPTS])
    return {"tokens": [o.outputs[0].token_ids for o in outs], "logits": logits}


def _write_on_every_node(path: str) -> None:
    """The default checkpoint at the same path on every node (it is seeded, so the bytes are the same): a cluster
    needs no shared folder to run the check."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from llama4.checkpoint import ensure_checkpoint

    def write(p: str) -> None:
        ensure_checkpoint("maverick-tiny", p)

    task = ray.remote(num_cpus=0)(write)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(path)
             for n in nodes])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.expert_parallel.selfcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint folder (config and tokenizer; default: write maverick-tiny)")
    p.add_argument("--weights", help="where workers read tensors, if not the folder: s3://bucket/prefix")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for --weights")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("-n", "--expert-parallel-size", type=int, default=2, help="workers in the replica")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="workers per node")
    p.add_argument("--nodes", help="comma-separated custom resources naming each node (pins the workers)")
    p.add_argument("--address", default="local", help="Ray cluster to join: 'auto', an address, or 'local' "
                                                      "(start one here; the default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--atol", type=float, default=1e-4, help="largest logit difference accepted")
    p.add_argument("--max-tokens", type=int, default=12)
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from llama4.checkpoint import ensure_checkpoint
    from serving.engine import LLMEngine

    path = a.checkpoint or str(ensure_checkpoint("maverick-tiny", Path(tempfile.gettempdir()) / "herd-selfcheck"))
    if a.address == "local":
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=a.address, log_to_driver=False)
    try:
        if not a.checkpoint and not a.weights:
            _write_on_every_node(path)
        gpus = ray.cluster_resources().get("GPU", 0)
        if a.device == "cuda" and gpus < a.expert_parallel_size:
            print(f"error: --device cuda with {a.expert_parallel_size} workers needs {a.expert_parallel_size} GPUs; "
                  f"the Ray cluster has {gpus:g}", file=sys.stderr)
            return 2
        print(f"reference: single-process engine on {a.device}", flush=True)
        if a.device == "cuda":  # the driver may sit on a node without GPUs
            ref = ray.get(ray.remote(num_gpus=1, num_cpus=0.5)(_reference).remote(path, "cuda", a.dtype,
                                                                                   a.max_tokens))
        else:
            ref = _reference(path, "cpu", a.dtype, a.max_tokens)
        print(f"expert-parallel: {a.expert_parallel_size} workers, {a.tensor_parallel_size} per node, {a.device}",
              flush=True)
        try:
            engine = LLMEngine.from_pretrained(
                path, dtype=a.dtype, device=a.device, max_num_seqs=8, max_model_len=256,
                expert_parallel_size=a.expert_parallel_size, tensor_parallel_size=a.tensor_parallel_size,
                nodes=a.nodes.split(",") if a.nodes else None, weights=a.weights, s3_endpoint_url=a.s3_endpoint_url,
                num_cpus_per_worker=0.25 if a.device == "cpu" else 1.0)
        except (ValueError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            got = _run(engine, a.max_tokens)
            ex = engine.executor
            for where, held in zip(ex.placement, ex.worker_bytes):
                print(f"  rank {held['rank']}: node {held['node']} ({where['ip']}, ray node {where['node_id'][:8]}), "
                      f"{held['device']}{' gpu ' + ','.join(where['gpu_ids']) if where['gpu_ids'] else ''}: "
                      f"{held['routed_expert_bytes'] / 2**20:.1f} MiB experts, {held['other_bytes'] / 2**20:.1f} MiB "
                      f"rest, KV blocks {held['kv_blocks'][0]} global / {held['kv_blocks'][1]} chunked", flush=True)
            routed = int(engine.routed_token_counts().sum())
        finally:
            engine.shutdown()
    finally:
        ray.shutdown()

    same = got["tokens"] == ref["tokens"]
    diff = (got["logits"] - ref["logits"]).abs().max().item()
    print(f"greedy tokens identical: {'yes' if same else 'NO'} ({len(PROMPTS)} prompts x {a.max_tokens} tokens); "
          f"max |logit difference| {diff:.2e} (atol {a.atol:g}); {routed} token-expert routings")
    ok = same and diff <= a.atol
    print("OK: expert parallelism gives the single-process answer" if ok else
          "MISMATCH: expert parallelism differs from the single-process engine")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: herd's main job on the local default, end to end, on a small Llama 4 checkpoint.

Steps: make a checkpoint in the released Hugging Face layout, plan the local cluster file, generate with the
engine in one process, bring up a local Ray cluster and serve the model over the OpenAI API with its experts split
over two workers, fine-tune a LoRA adapter with Ray Train + DeepSpeed, and report monthly active users against the
licence's threshold (including the users the server just saw, hashed). Everything stays on 127.0.0.1 and in
./herd-data; each step prints what it did.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(os.environ.get("HERD_DEMO_DIR", "herd-data")).resolve()
CHECKPOINT = ROOT / "checkpoints" / "maverick-tiny"  # where infra/clusters/local.yaml expects it
CLUSTER_FILE = Path(__file__).resolve().parent.parent / "infra" / "clusters" / "local.yaml"
DEMO_LICENSING_KEY = "herd-demo-key-synthetic-users-only"  # the demo's users are made up; real stores set their own


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def make_checkpoint() -> None:
    from llama4.checkpoint import CheckpointReader, ensure_checkpoint
    from llama4.config import TextConfig
    from llama4.sizing import param_counts

    step(f"1. checkpoint: maverick-tiny in the released Llama 4 layout -> {CHECKPOINT}")
    ensure_checkpoint("maverick-tiny", CHECKPOINT)
    cfg = TextConfig.from_pretrained(CHECKPOINT)
    counts = param_counts(cfg)
    shards = sorted(set(CheckpointReader(CHECKPOINT).weight_map.values()))
    print(f"   {cfg.num_hidden_layers} layers (MoE on {list(cfg.moe_layers)}, NoPE on "
          f"{[i for i, r in enumerate(cfg.rope_layers) if not r]}), {cfg.num_local_experts} experts, "
          f"vocab {cfg.vocab_size}, {counts.total / 1e6:.2f}M text parameters ({counts.active / 1e6:.2f}M active), "
          f"{len(shards)} safetensors shards")


def plan() -> None:
    from herd.cli import main as herd

    step(f"2. plan: herd plan {CLUSTER_FILE.relative_to(Path.cwd()) if CLUSTER_FILE.is_relative_to(Path.cwd()) else CLUSTER_FILE}")
    herd(["plan", str(CLUSTER_FILE)])


def generate() -> None:
    from serving.engine import LLMEngine, SamplingParams

    step("3. generate: herd's engine in one process (no Ray), greedy")
    engine = LLMEngine.from_pretrained(str(CHECKPOINT), dtype="float32")
    prompt_ids = engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = engine.generate([prompt_ids], SamplingParams(max_tokens=16, temperature=0.0))[0]
    print(f"   {len(out.prompt_token_ids)} prompt tokens -> {len(out.outputs[0].token_ids)} tokens "
          f"({out.outputs[0].finish_reason}): {out.outputs[0].text!r}")
    print("   (random weights: the words mean nothing; tests hold them equal to transformers token for token)")
    engine.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_ray_loggers() -> None:
    """Ray's, Serve's and Ray Data's driver-side INFO lines (and the progress-bar notice) are not the demo's: only
    their console output is raised to ERROR; Ray Data's own log file (ray-data.log) keeps everything."""
    import logging

    import ray.data  # noqa: F401  (configures the "ray.data" logger on import; adjust it afterwards)

    for name in ("ray", "ray.serve", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def serve_and_query() -> None:
    import ray
    from openai import OpenAI
    from ray import serve

    from cluster.render.serve import serve_args
    from cluster.schema import load_cluster
    from serving.app import build_app

    args = serve_args(load_cluster(CLUSTER_FILE))
    step(f"4. serve: a local Ray cluster on 127.0.0.1, Ray Serve with experts over "
         f"{args.get('expert_parallel_size', 1)} workers, queried with the openai client")
    port = _free_port()
    # The demo prints its own steps; Ray's processes log to their files (/tmp/ray/session_latest/logs), not here.
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    _quiet_ray_loggers()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly",
                logging_config={"log_level": "WARNING"})
    t0 = time.time()
    serve.run(build_app(args), name="herd", route_prefix="/", blocking=False,
              logging_config={"log_level": "WARNING"})
    print(f"   serving at http://127.0.0.1:{port}/v1 after {time.time() - t0:.0f}s")
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    for user in ("alice@example.com", "bob@example.com", "alice@example.com"):
        r = client.chat.completions.create(model=model, user=user, max_tokens=8, temperature=0.0,
                                           messages=[{"role": "user", "content": "Say hello."}])
        print(f"   {model} answered a request ({r.usage.prompt_tokens}+{r.usage.completion_tokens} tokens): "
              f"{r.choices[0].message.content!r}")
    chunks = client.chat.completions.create(model=model, max_tokens=8, stream=True, user="carol@example.com",
                                            messages=[{"role": "user", "content": "Count to three."}])
    print(f"   streamed {sum(1 for _ in chunks)} SSE chunks")
    import httpx

    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    shown = [m for m in metrics.splitlines() if m.startswith(("herd:generation_tokens_total",
                                                               "herd:request_success_total"))]
    print("   /metrics: " + "; ".join(shown[:3]))
    serve.delete("herd")  # replicas flush their hashed MAU sketches to the store on shutdown


def finetune() -> None:
    from finetune.job import run
    from finetune.schema import load_job

    step("5. fine-tune: LoRA on attention, shared and routed experts; Ray Train, 2 workers, DeepSpeed ZeRO-2; "
         "then serve the adapter")
    work = ROOT / "demo" / "finetune"
    work.mkdir(parents=True, exist_ok=True)
    facts = [("What is herd?", "herd runs Llama 4 on your own Ray cluster."),
             ("Who counts the users?", "The licensing module counts monthly active users.")]
    with open(work / "facts.jsonl", "w") as f:
        for q, a in facts:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    shutil.rmtree(work / "runs", ignore_errors=True)  # a fresh run each time (the same name would resume it)
    job_file = work / "job.yaml"
    job_file.write_text(
        f"name: demo-memorise\nbase_model: {CHECKPOINT}\ndataset:\n  path: {work / 'facts.jsonl'}\n"
        "adapter:\n  name: Llama-4-demo-adapter\n  distributed: false\n"
        f"checkpoint:\n  storage_path: {work / 'runs'}\n  every_steps: 10\n"
        "lora:\n  rank: 8\n  alpha: 16\n  dropout: 0.0\n"
        "deepspeed:\n  zero_stage: 2\nresources:\n  workers: 2\n  cpus_per_worker: 0.5\n"
        "training:\n  batch_size: 2\n  sequence_length: 64\n  learning_rate: 0.01\n  steps: 40\n  seed: 0\n")
    print("   training 40 steps to memorise two facts (about a minute; the first run on a machine also builds "
          "DeepSpeed's CPU ops, about 100 s)", flush=True)
    _quiet_ray_loggers()
    uri = run(load_job(job_file))
    metrics = json.loads((Path(uri) / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"]]
    if losses:
        print(f"   loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    print(f"   adapter (PEFT format), NOTICE, metrics.json and loss.png in {uri}")
    serve_adapter(Path(uri) / "adapter", facts)


def serve_adapter(adapter: Path, facts: list[tuple[str, str]]) -> None:
    """The fine-tune served: the engine merges the adapter as it loads (`herd serve --lora-adapter` does the same)."""
    from serving.engine import LLMEngine, SamplingParams

    engine = LLMEngine.from_pretrained(CHECKPOINT, dtype="float32", max_num_seqs=2, max_model_len=256,
                                       lora_adapter=adapter)
    try:
        prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q, _ in facts]
        outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
        for (q, trained), out in zip(facts, outs):
            text = out.outputs[0].text.strip()
            mark = "the trained answer" if text == trained else f"trained on {trained!r}"
            print(f"   served with the adapter merged: {q!r} -> {text!r} ({mark})")
    finally:
        engine.shutdown()


def licensing_report() -> None:
    import licensing

    step("6. licence: monthly active users of all products vs the 700M threshold (users stored as keyed hashes)")
    print(licensing.demo_report(str(ROOT / "demo" / "licensing")))
    from herd.cli import main as herd

    png = ROOT / "demo" / "licensing" / "mau-trend.png"
    print("\n   The running view of the same store, which also holds the server's users from step 4 (product llm-api):")
    herd(["license", "report", "--plot", str(png)])
    print(f"   MAU trend chart: {png}")


def main() -> int:
    t0 = time.time()
    print("herd demo: Llama 4 on the local default (tiny checkpoint, local Ray on 127.0.0.1, storage in ./herd-data)")
    os.environ.setdefault("HERD_LICENSING_KEY", DEMO_LICENSING_KEY)
    os.environ.setdefault("HERD_LICENSING_STORE", str(ROOT / "demo" / "licensing" / "store"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
    make_checkpoint()
    plan()
    generate()
    try:
        serve_and_query()
        finetune()
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # stops Serve with the cluster (serve.shutdown first only adds a raylet warning)
    licensing_report()
    print(f"\nDone in {time.time() - t0:.0f}s. Built with Llama.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

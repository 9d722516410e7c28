"""Benchmark: herd's HTTP server (Ray Serve + OpenAI API) against the in-process engine on the same prompts.

A concurrency sweep as `vllm bench serve` runs it: N requests, at most C in flight, each streaming a completion of
exactly `--max-tokens` tokens (ignore_eos) from a fixed-length prompt. For every C it reports request and token
throughput and TTFT, TPOT, ITL and end-to-end latency (mean / median / p99), for the server (through HTTP, SSE)
and for `AsyncLLMEngine` driven in-process with the same prompts, settings and concurrency; the ratio is what
the HTTP layer costs.

    python -m bench.serve                                  # starts a local Ray + the app on scout-tiny
    python -m bench.serve --url http://127.0.0.1:8000 --model NAME --checkpoint DIR   # an already running server
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on loopback


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="scout-tiny", help="checkpoint preset created in ./checkpoints/ if needed")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--url", default=None, help="a running herd server (default: start one here)")
    ap.add_argument("--model", default="bench", help="served model name")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--expert-parallel", type=int, default=1)
    ap.add_argument("--stream-interval", type=float, default=0.0, help="server's stream_interval_s")
    ap.add_argument("--skip-engine", action="store_true", help="HTTP only (no in-process reference)")
    return ap.parse_args(argv)


@dataclass
class Sample:
    """One request's timeline: when it was sent, when each token batch arrived, how many tokens it got."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.arrivals[-1] - self.sent

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / max(self.tokens - 1, 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def checkpoint(args) -> Path:
    from llama4.checkpoint import ensure_checkpoint

    return ensure_checkpoint(args.preset, args.checkpoint or Path("checkpoints") / args.preset)


def prompts(path: Path, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` token ids, cut from the tokenized corpus herd ships."""
    from transformers import AutoTokenizer

    from llama4.tokenizer import CORPUS

    ids = AutoTokenizer.from_pretrained(str(path)).encode(CORPUS.read_text(encoding="utf-8"))
    step = max((len(ids) - length) // max(n, 1), 1)
    return [ids[i * step:i * step + length] for i in range(n)]


# ---- the two ways of running the same requests ---------------------------------------------------------------
async def http_request(client, model: str, prompt: list[int], max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    s = Sample(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"]:
                s.arrivals.append(time.perf_counter())
            if event.get("usage"):
                s.tokens, s.prompt_tokens = event["usage"]["completion_tokens"], event["usage"]["prompt_tokens"]
    return s


async def engine_request(engine, rid: str, prompt: list[int], max_tokens: int) -> Sample:
    from serving.engine import SamplingParams

    s = Sample(time.perf_counter(), prompt_tokens=len(prompt))
    async for d in engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                   ignore_eos=True)):
        if d.new_text:
            s.arrivals.append(time.perf_counter())
        s.tokens = d.num_generated_tokens
    return s


async def sweep_point(run_one, prompt_set, concurrency: int) -> tuple[list[Sample], float]:
    gate = asyncio.Semaphore(concurrency)

    async def limited(i, p):
        async with gate:
            return await run_one(i, p)

    t0 = time.perf_counter()
    samples = await asyncio.gather(*[limited(i, p) for i, p in enumerate(prompt_set)])
    return list(samples), time.perf_counter() - t0


# ---- figures -------------------------------------------------------------------------------------------------
def summary(samples: list[Sample], wall: float) -> dict:
    def stats(xs):
        xs = sorted(xs)
        return {"mean": statistics.fmean(xs) * 1e3, "median": statistics.median(xs) * 1e3,
                "p99": xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))] * 1e3}

    out_tok = sum(s.tokens for s in samples)
    return {"req_s": len(samples) / wall, "out_tok_s": out_tok / wall,
            "total_tok_s": (out_tok + sum(s.prompt_tokens for s in samples)) / wall,
            "ttft": stats([s.ttft for s in samples]), "tpot": stats([s.tpot for s in samples]),
            "itl": stats([x for s in samples for x in s.itls] or [0.0]), "e2e": stats([s.e2e for s in samples])}


def print_point(c: int, http: dict, ref: dict | None) -> None:
    print(f"\n== concurrency {c} ==")
    rows = [("request throughput (req/s)", "req_s"), ("output token throughput (tok/s)", "out_tok_s"),
            ("total token throughput (tok/s)", "total_tok_s")]
    print(f"{'':34}{'HTTP':>12}{'engine':>12}{'HTTP/engine':>13}")
    for label, k in rows:
        r = ref[k] if ref else float("nan")
        print(f"{label:34}{http[k]:12.2f}{r:12.2f}{http[k] / r if ref else float('nan'):13.2f}")
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for agg in ("mean", "median", "p99"):
            h = http[metric][agg]
            r = ref[metric][agg] if ref else float("nan")
            ratio = h / r if ref and r else float("nan")
            print(f"{metric.upper() + ' ' + agg + ' (ms)':34}{h:12.1f}{r:12.1f}{ratio:13.2f}")


# ---- setup ---------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    path = checkpoint(args)
    prompt_set = prompts(path, args.num_prompts, args.prompt_len)
    max_len = args.prompt_len + args.max_tokens + 8
    max_seqs = max(args.concurrency)
    print(f"bench/serve: {args.num_prompts} prompts x {args.prompt_len} tokens -> {args.max_tokens} tokens, "
          f"checkpoint {path}, EP={args.expert_parallel}, stream interval {args.stream_interval}s, "
          f"{os.cpu_count()} CPUs", flush=True)

    import httpx

    url = args.url or launch(path, args, max_len, max_seqs)
    # The in-process engine lives beside the (idle between points) server, and each concurrency point runs
    # HTTP then engine back to back, so both see the same machine load.
    engine = None if args.skip_engine else build_engine(path, args, max_len, max_seqs)
    results = {}
    for c in args.concurrency:
        async def http_point():
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                await http_request(client, args.model, prompt_set[0], 2)  # warm-up
                return await sweep_point(lambda i, p: http_request(client, args.model, p, args.max_tokens),
                                         prompt_set, c)

        async def engine_point():
            await engine_request(engine, f"warmup-{c}", prompt_set[0], 2)
            return await sweep_point(lambda i, p: engine_request(engine, f"c{c}-{i}", p, args.max_tokens),
                                     prompt_set, c)

        results[c] = {"http": summary(*asyncio.run(http_point()))}
        if engine is not None:
            results[c]["engine"] = summary(*asyncio.run(engine_point()))
        print_point(c, results[c]["http"], results[c].get("engine"))
    if engine is not None:
        engine.shutdown()
    shutdown_server(args)


def launch(path: Path, args, max_len: int, max_seqs: int) -> str:
    """Start a local Ray cluster on loopback and herd's app on a free port; return its URL."""
    import socket

    import httpx
    import ray
    from ray import serve

    from serving.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    app = build_app({"model": str(path), "served_model_name": args.model, "max_model_len": max_len,
                     "max_num_seqs": max_seqs, "max_waiting_requests": 4 * max_seqs, "dtype": "float32",
                     "expert_parallel_size": args.expert_parallel, "app_name": "bench",
                     "stream_interval_s": args.stream_interval})
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    print(f"server up at {url}", flush=True)
    return url


def shutdown_server(args) -> None:
    if args.url is None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def build_engine(path: Path, args, max_len: int, max_seqs: int):
    import torch

    from serving.engine import AsyncLLMEngine

    torch.set_num_threads(1)  # as each Serve replica does
    return AsyncLLMEngine.from_pretrained(str(path), dtype="float32", max_num_seqs=max_seqs, max_model_len=max_len,
                                          expert_parallel_size=args.expert_parallel,
                                          max_waiting_requests=4 * max_seqs)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Benchmark: what the paged KV cache buys, on maverick-bench (CPU), against a static slot cache in the same run.

(a) Sequences run at once at a fixed KV budget when `max_model_len` is 16x what the sequences use. A static slot
    cache reserves `max_model_len` per sequence, so it runs budget // (one full sequence's bytes) of them (herd's
    rule before blocks, computed here with the same sizing arithmetic); it is measured by running the same engine
    with that many sequences at most. The paged cache runs as many as its free blocks hold. Both peaks come from
    the engine's stats, and both runs' tokens must be equal.
(b) Time to first token of a request whose 1,500-token system prompt is cached, against the first request that
    computed it (prefix caching).
(c) Decode speed against the slot cache is measured by alternating runs of `bench.engine` at the commit before
    blocks and after (BENCHMARKS.md has the command and the medians): the slot cache's code is not kept.
(d) `n` samples of one 1,000-token prompt (n=8): one request with n=8 (the prompt computed once, the samples fork
    from its blocks) against eight single requests sent together with the seeds it derives (each computes the
    prompt unless another has cached its blocks first). Medians of 5 alternating runs of the time until every
    sample has its first token and until all finish; tokens must be equal.

    python -m bench.kv_cache                 # maverick-bench, created in ./checkpoints/ on first run
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints") / "maverick-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=48, help="requests in (a)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--slots", type=float, default=2.0, help="(a): the KV budget, in full max_model_len sequences")
    ap.add_argument("--system-len", type=int, default=1500, help="(b): tokens of the shared system prompt")
    ap.add_argument("--n", type=int, default=8, help="(d): samples of one prompt")
    ap.add_argument("--n-prompt-len", type=int, default=1000, help="(d): its tokens")
    ap.add_argument("--n-runs", type=int, default=5, help="(d): alternating runs of each")
    ap.add_argument("--only", choices=["a", "b", "d"], help="run one part")
    return ap.parse_args(argv)


def _engine(path: Path, **kw):
    from serving.engine import LLMEngine

    return LLMEngine.from_pretrained(path, dtype="float32", **kw)


def _peak_run(engine, prompts, new_tokens: int) -> tuple[int, list[list[int]], float]:
    """Run every prompt to completion; (most sequences running in any step, tokens, seconds)."""
    from serving.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    peak, tokens, t0 = 0, {}, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        peak = max(peak, engine.stats().num_running)
    return peak, [tokens[f"r{i}"] for i in range(len(prompts))], time.perf_counter() - t0


def concurrency(args, path: Path, cfg) -> None:
    from llama4.sizing import kv_bytes_per_token

    seq_len = args.prompt_len + args.new_tokens
    max_len = 16 * seq_len
    full = kv_bytes_per_token(cfg, "fp32").sequence_bytes(max_len)
    budget = args.slots * full
    slots = int(budget // full)  # the static cache's rule: one max_model_len reservation per sequence
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 2000, (args.prompt_len,), generator=g).tolist() for _ in range(args.seqs)]
    print(f"(a) KV budget {budget / 2**20:.1f} MiB = {args.slots:g} sequences of max_model_len {max_len}; "
          f"{args.seqs} requests of {args.prompt_len} + {args.new_tokens} tokens", flush=True)
    # The slot run takes its requests `slots` at a time: a few rounds show its peak and give tokens to compare.
    few = min(len(prompts), 4 * slots)
    slot = _engine(path, max_num_seqs=slots, max_model_len=max_len, kv_cache_memory_bytes=budget)
    slot_peak, slot_tokens, slot_s = _peak_run(slot, prompts[:few], args.new_tokens)
    slot.shutdown()
    paged = _engine(path, max_num_seqs=args.seqs, max_model_len=max_len, kv_cache_memory_bytes=budget,
                    mean_sequence_tokens=seq_len)
    paged_peak, paged_tokens, paged_s = _peak_run(paged, prompts, args.new_tokens)
    st = paged.stats()
    paged.shutdown()
    same = paged_tokens[:few] == slot_tokens
    print(f"    slot cache : {slot_peak:3d} sequences at once ({few} requests: {few / slot_s:.2f} requests/s)",
          flush=True)
    print(f"    paged cache: {paged_peak:3d} sequences at once ({len(prompts)} requests: {len(prompts) / paged_s:.2f} "
          f"requests/s), {st.num_preemptions} preemptions; tokens of the first {few} equal: {same}", flush=True)
    print(f"    ratio paged / slot: {paged_peak / max(slot_peak, 1):.1f}x sequences at once, "
          f"{(len(prompts) / paged_s) / (few / slot_s):.1f}x the requests per second", flush=True)
    assert same, "the paged run's tokens differ from the slot run's"


def time_to_first_token(args, path: Path) -> None:
    from serving.engine import SamplingParams

    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, 2000, (args.system_len,), generator=g).tolist()
    asks = [system + torch.randint(3, 2000, (24,), generator=g).tolist() for _ in range(4)]
    engine = _engine(path, max_num_seqs=4, max_model_len=2048, max_num_batched_tokens=2048)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine.generate([list(range(10, 20))], params)  # warm-up
    ttft = []
    for ids in asks:
        t0 = time.perf_counter()
        engine.generate([ids], params)
        ttft.append(time.perf_counter() - t0)
    st = engine.stats()
    engine.shutdown()
    later = sorted(ttft[1:])[len(ttft[1:]) // 2]
    print(f"(b) time to first token, {args.system_len}-token system prompt + 24: first request {ttft[0] * 1e3:.0f} ms, "
          f"later ones (cached prefix, median of {len(ttft) - 1}) {later * 1e3:.0f} ms: ratio {later / ttft[0]:.3f}; "
          f"prefix hits {st.prefix_cache_hits} of {st.prefix_cache_queries} prompt tokens", flush=True)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _until_done(engine, ids: set[str]) -> tuple[dict, float, float]:
    """Step until the requests finish; (tokens per (request, sample), seconds to every first token, to the end)."""
    t0, first_all, tokens = time.perf_counter(), None, {}
    while engine.has_unfinished_requests():
        engine.step()
        live = [r for rid in ids if rid in engine._requests for r in engine._requests[rid].samples]
        if first_all is None and all(r.num_generated for r in live):
            first_all = time.perf_counter() - t0
        for r in live:
            tokens[(r.request_id, r.index)] = r.output_token_ids
    return tokens, first_all or 0.0, time.perf_counter() - t0


def n_samples(args, path: Path) -> None:
    from serving.engine import SamplingParams
    from serving.engine.params import sample_seed

    n, g = args.n, torch.Generator().manual_seed(2)
    ids = torch.randint(3, 2000, (args.n_prompt_len,), generator=g).tolist()
    engine = _engine(path, max_num_seqs=n, max_model_len=2048, max_num_batched_tokens=2048)
    kw = dict(max_tokens=16, ignore_eos=True)
    engine.generate([list(range(10, 20))], SamplingParams(**kw))  # warm-up
    rows = []
    for run in range(args.n_runs):  # alternating: one n request, then n single requests
        for kind in ("n", "singles"):
            engine.kv.reset()  # nothing cached from the previous run
            c0 = engine.stats().prompt_tokens_computed
            if kind == "n":
                engine.add_request(f"n{run}", ids, SamplingParams(n=n, seed=5, **kw))
                rids = {f"n{run}"}
            else:
                rids = {f"s{run}-{i}" for i in range(n)}
                for i in range(n):
                    engine.add_request(f"s{run}-{i}", ids, SamplingParams(seed=sample_seed(5, i), **kw))
            tokens, first, total = _until_done(engine, rids)
            samples = [tokens[(f"n{run}", i)] for i in range(n)] if kind == "n" else \
                [tokens[(f"s{run}-{i}", 0)] for i in range(n)]
            rows.append((kind, first, total, engine.stats().prompt_tokens_computed - c0, samples))
    engine.shutdown()
    med = {k: [_median([r[j] for r in rows if r[0] == k]) for j in (1, 2)] for k in ("n", "singles")}
    same = all(r[4] == rows[0][4] for r in rows)
    computed = {r[0]: r[3] for r in rows}
    print(f"(d) medians of {args.n_runs} alternating runs; n={n} samples of a {args.n_prompt_len}-token prompt, 16 tokens each: one n={n} request computes "
          f"{computed['n']} prompt tokens, {n} single requests {computed['singles']}; every first token after "
          f"{med['n'][0] * 1e3:.0f} ms vs {med['singles'][0] * 1e3:.0f} ms (ratio {med['n'][0] / med['singles'][0]:.3f}), "
          f"all done after {med['n'][1] * 1e3:.0f} ms vs {med['singles'][1] * 1e3:.0f} ms (ratio "
          f"{med['n'][1] / med['singles'][1]:.3f}); tokens equal: {same}", flush=True)
    assert same, "the n request's samples differ from the single requests with the derived seeds"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from llama4.checkpoint import ensure_checkpoint
    from llama4.config import TextConfig

    path = ensure_checkpoint("maverick-bench", args.checkpoint)
    cfg = TextConfig.from_pretrained(path)
    print(f"machine: {torch.get_num_threads()} threads; maverick-bench, fp32, block size 16", flush=True)
    if args.only in (None, "a"):
        concurrency(args, path, cfg)
    if args.only in (None, "b"):
        time_to_first_token(args, path)
    if args.only in (None, "d"):
        n_samples(args, path)


if __name__ == "__main__":
    main()

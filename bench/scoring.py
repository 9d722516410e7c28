"""Benchmark: scoring prompts with herd's engine against transformers on the same checkpoint, same threads.

Scoring is what completions `echo` + `logprobs` do and what lm-evaluation-harness's log-likelihood tasks send: the
log-probability of every prompt token under the model. herd runs each prompt's pieces once and returns every
position's logits with them (at most 256 rows a step); the reference is transformers' `Llama4ForCausalLM` forward
over the whole batch of prompts plus `log_softmax`. Both must agree within 1e-4 (fp32). Medians of alternating
runs (herd, transformers, herd, ...). Once more, herd with one scored row per piece (`SCORED_ROWS_PER_STEP` = 1:
what the engine did before pieces returned every row, one step per prompt token), for the step count and time.

    python -m bench.scoring                  # maverick-bench, created in ./checkpoints/ on first run
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
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="alternating runs of each")
    return ap.parse_args(argv)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def herd_scores(engine, prompts: list[list[int]]) -> tuple[torch.Tensor, int, float]:
    """[P, L-1] log-probabilities of tokens 1..L-1 of each prompt, the engine steps it took, seconds."""
    from serving.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    t0, steps = time.perf_counter(), 0
    for i, p in enumerate(prompts):
        engine.add_request(f"score-{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    seconds = time.perf_counter() - t0
    rows = [[done[f"score-{i}"].prompt_logprobs[j][t].logprob for j, t in enumerate(p) if j]
            for i, p in enumerate(prompts)]
    return torch.tensor(rows), steps, seconds


@torch.inference_mode()
def reference_scores(model, prompts: list[list[int]]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    ids = torch.tensor(prompts)
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    out = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.engine import hf_from_checkpoint
    from llama4.checkpoint import ensure_checkpoint
    from serving.engine import LLMEngine

    path = ensure_checkpoint("maverick-bench", args.checkpoint)
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(3, 2000, (args.prompts, args.prompt_len), generator=g).tolist()
    engine = LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=args.prompts,
                                       max_model_len=args.prompt_len + 16, max_num_batched_tokens=2048)
    model = hf_from_checkpoint(path, "float32")
    herd_scores(engine, [p[:32] for p in prompts])  # warm-up both
    reference_scores(model, [p[:32] for p in prompts])
    herd_s, ref_s, worst = [], [], 0.0
    for _ in range(args.runs):
        got, steps, s = herd_scores(engine, prompts)
        herd_s.append(s)
        want, s = reference_scores(model, prompts)
        ref_s.append(s)
        worst = max(worst, (got - want).abs().max().item())
    from serving.engine import scheduler

    scheduler.SCORED_ROWS_PER_STEP, rows = 1, scheduler.SCORED_ROWS_PER_STEP
    old, old_steps, old_s = herd_scores(engine, prompts)
    scheduler.SCORED_ROWS_PER_STEP = rows
    engine.shutdown()
    tokens = args.prompts * args.prompt_len
    h, r = _median(herd_s), _median(ref_s)
    print(f"machine: {torch.get_num_threads()} threads; maverick-bench, fp32", flush=True)
    print(f"scoring {args.prompts} prompts x {args.prompt_len} tokens (medians of {args.runs} alternating runs): "
          f"herd {h * 1e3:.0f} ms in {steps} engine steps ({tokens / h:.0f} tokens/s), transformers forward + "
          f"log_softmax {r * 1e3:.0f} ms ({tokens / r:.0f} tokens/s): ratio herd/transformers time {h / r:.2f}; "
          f"max |difference| {worst:.1e}", flush=True)
    print(f"one scored row a step (before): {old_s * 1e3:.0f} ms in {old_steps} engine steps: this path takes "
          f"{h / old_s:.3f}x the time; same scores: {(old - got).abs().max().item():.1e}", flush=True)
    assert worst < 1e-4, f"herd's scores differ from transformers' by {worst}"


if __name__ == "__main__":
    main()

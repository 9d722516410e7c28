"""Next-token choice from a step's logits: greedy, temperature, top-k, top-p, per-request seeds, top-n logprobs.

Greedy rows are decided together with one argmax; sampled rows one by one, each with its own generator when the
request has a seed (so its tokens do not depend on what else is in the batch). Log-probabilities are those of the
model's own distribution (raw logits), as vLLM reports them by default.
"""
from __future__ import annotations

import torch

from serving.engine.params import SamplingParams


def filtered_logits(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p; removed tokens get -inf."""
    logits_V = logits_V / params.temperature
    if 0 < params.top_k < logits_V.shape[-1]:
        kth = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        probs_V = torch.softmax(sorted_V, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop_V = (torch.cumsum(probs_V, dim=-1) - probs_V) >= params.top_p
        logits_V = logits_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, float("-inf")))
    return logits_V


def sample_row(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    probs_V = torch.softmax(filtered_logits(logits_V, params), dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def choose_tokens(logits_NV: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> list[int]:
    """One token per row."""
    chosen = logits_NV.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            chosen[i] = sample_row(logits_NV[i], p, generators[i])
    return chosen


def top_logprobs(logits_V: torch.Tensor, token: int, n: int) -> list[tuple[int, float, int]]:
    """(token id, logprob, rank) for the chosen token followed by the n most likely tokens."""
    logp_V = torch.log_softmax(logits_V.float(), dim=-1)
    chosen_lp = float(logp_V[token])
    out = [(token, chosen_lp, int((logp_V > chosen_lp).sum()) + 1)]
    if n > 0:
        values, ids = torch.topk(logp_V, n)
        out.extend((int(t), float(v), r + 1) for r, (t, v) in enumerate(zip(ids.tolist(), values.tolist())))
    return out

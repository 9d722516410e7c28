"""Next-token choice from a step's logits: bias, penalties, grammar masks, greedy, temperature, min-p, top-k,
top-p, per-request seeds, top-n logprobs.

The order is vLLM's: logit_bias, then repetition / frequency / presence penalties (on a copy of the rows that ask
for them), then the grammar mask of constrained rows (serving/engine/structured.py), then greedy argmax or
temperature -> min_p -> top-k -> top-p and a draw. Greedy rows are decided together with one argmax; sampled rows
one by one, each with its own generator when the request has a seed (so its tokens do not depend on what else is
in the batch). Log-probabilities are those of the model's own distribution (raw logits, before bias, penalties,
masks and temperature), as vLLM reports them by default.
"""
from __future__ import annotations

from typing import Sequence

import torch

from serving.engine.params import SamplingParams

# (prompt token ids, generated token ids) of one row, for the penalties.
History = tuple[Sequence[int], Sequence[int]]


def adjusted_logits(logits_V: torch.Tensor, params: SamplingParams, history: History) -> torch.Tensor:
    """A copy of one row with logit_bias added, then vLLM's repetition, frequency and presence penalties."""
    logits_V = logits_V.clone()
    V = logits_V.shape[-1]
    if params.logit_bias:
        ids = [t for t in params.logit_bias if t < V]  # the API refuses ids outside the vocabulary
        logits_V[ids] += torch.tensor([params.logit_bias[t] for t in ids], dtype=logits_V.dtype)
    prompt_ids, output_ids = history
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.long).unique()
        if seen.numel():
            vals = logits_V[seen]
            logits_V[seen] = torch.where(vals > 0, vals / params.repetition_penalty,
                                         vals * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and len(output_ids):
        counts_V = torch.bincount(torch.tensor(list(output_ids), dtype=torch.long), minlength=V).to(logits_V.dtype)
        logits_V -= params.frequency_penalty * counts_V + params.presence_penalty * (counts_V > 0).to(logits_V.dtype)
    return logits_V


def filtered_logits(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then min-p, top-k, top-p; removed tokens get -inf."""
    logits_V = logits_V / params.temperature
    if params.min_p > 0.0:
        # p >= min_p * p_max  <=>  logit >= max logit + log(min_p)
        floor = logits_V.max() + torch.log(torch.tensor(params.min_p, dtype=logits_V.dtype))
        logits_V = logits_V.masked_fill(logits_V < floor, float("-inf"))
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
    if generator is not None and probs_V.device != generator.device:
        # A seeded request's generator is a CPU one (make_request): draw there, so the same seed gives the same
        # draws whatever device the logits came from (one vocabulary-sized copy per seeded row).
        probs_V = probs_V.to(generator.device)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def choose_tokens(logits_NV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  histories: Sequence[History | None] | None = None, grammars: Sequence | None = None) -> list[int]:
    """One token per row. `histories[i]` is needed when row i has penalties; `grammars[i]` (a
    structured.GrammarState) constrains row i. `logits_NV` itself is left as it was (logprobs read it)."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    constrained = [i for i, g in enumerate(grammars or ()) if g is not None]
    if rows or constrained:
        logits_NV = logits_NV.clone()
        for i in rows:
            logits_NV[i] = adjusted_logits(logits_NV[i], params[i], histories[i])
        if constrained:
            from serving.engine.structured import apply_grammar_masks

            apply_grammar_masks(logits_NV, grammars, constrained)
    chosen = logits_NV.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            chosen[i] = sample_row(logits_NV[i], p, generators[i])
    for i in constrained:
        grammars[i].accept(chosen[i])
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

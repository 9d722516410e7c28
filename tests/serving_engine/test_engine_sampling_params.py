"""Sampling parameters on constructed logits: logit_bias, repetition/frequency/presence penalties and min_p do what
their definitions (OpenAI's, vLLM's) say, in vLLM's order, and never touch the raw logits logprobs are read from."""
from __future__ import annotations

import pytest
import torch

from serving.engine import SamplingParams
from serving.engine.sampling import adjusted_logits, choose_tokens, filtered_logits

LOGITS = torch.tensor([2.0, -1.0, 1.0, 0.5, 1.9])


def test_logit_bias_adds_to_the_logit():
    p = SamplingParams(temperature=0.0, logit_bias={1: 5.0, 0: -100.0})
    out = adjusted_logits(LOGITS, p, ([], []))
    assert out.tolist() == pytest.approx([-98.0, 4.0, 1.0, 0.5, 1.9])
    raw = LOGITS.clone()[None]
    assert choose_tokens(raw, [p], [None], [([], [])]) == [1]
    assert torch.equal(raw[0], LOGITS)  # the raw row is kept for logprobs
    # -100 on the best token: greedy takes the next best (token 4)
    assert choose_tokens(LOGITS[None], [SamplingParams(temperature=0.0, logit_bias={0: -100.0})], [None],
                         [([], [])]) == [4]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    p = SamplingParams(repetition_penalty=2.0)
    # token 0 in the prompt (positive: halved), token 1 generated (negative: doubled), token 4 unseen
    out = adjusted_logits(LOGITS, p, ([0, 0], [1]))
    assert out.tolist() == pytest.approx([1.0, -2.0, 1.0, 0.5, 1.9])
    # greedy now prefers token 4, which was behind token 0 before
    assert choose_tokens(LOGITS[None], [SamplingParams(temperature=0.0, repetition_penalty=2.0)], [None],
                         [([0], [1])]) == [4]


def test_frequency_penalty_counts_occurrences_presence_penalty_does_not():
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    # prompt tokens do not count (OpenAI: "based on their existing frequency in the text so far" = the completion)
    out = adjusted_logits(LOGITS, p, ([3, 3, 3], [2, 2, 4]))
    want = LOGITS.clone()
    want[2] -= 2 * 0.5 + 0.25
    want[4] -= 1 * 0.5 + 0.25
    assert out.tolist() == pytest.approx(want.tolist())
    # negative penalties encourage repetition
    out = adjusted_logits(LOGITS, SamplingParams(presence_penalty=-2.0), ([], [1]))
    assert out[1].item() == pytest.approx(1.0)


def test_penalties_decide_the_greedy_token_per_row_in_a_mixed_batch():
    logits_NV = torch.stack([LOGITS, LOGITS, LOGITS])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, frequency_penalty=2.0),
              SamplingParams(temperature=0.0, logit_bias={3: 2.0})]
    hist = [None, ([], [0]), ([], [])]
    assert choose_tokens(logits_NV, params, [None] * 3, hist) == [0, 4, 3]


def test_min_p_keeps_tokens_above_the_fraction_of_the_best():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = filtered_logits(logits, SamplingParams(min_p=0.2)).isfinite()  # keep p >= 0.1
    assert kept.tolist() == [True, True, True, False]
    kept = filtered_logits(logits, SamplingParams(min_p=0.7)).isfinite()  # keep p >= 0.35
    assert kept.tolist() == [True, False, False, False]
    # applied after temperature (vLLM's order): at temperature 2 the distribution flattens and 0.05 survives
    kept = filtered_logits(logits, SamplingParams(min_p=0.2, temperature=2.0)).isfinite()
    assert kept.tolist() == [True, True, True, True]
    # sampled draws never leave the kept set
    g = torch.Generator().manual_seed(0)
    draws = {choose_tokens(logits[None], [SamplingParams(min_p=0.7)], [g])[0] for _ in range(50)}
    assert draws == {0}


@pytest.mark.parametrize("kw, words", [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(logit_bias={5: 101.0}), "logit_bias values must be in [-100, 100]"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
    (dict(prompt_logprobs=21), "prompt_logprobs must be between 0 and 20"),
])
def test_bad_values_name_the_field(kw, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kw)

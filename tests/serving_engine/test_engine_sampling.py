"""Sampling: seeds reproduce, filters behave, stop conditions end the text where they should, logprobs are right."""
from __future__ import annotations

import pytest
import torch

from serving.engine import LLMEngine, SamplingParams
from serving.engine.llm_engine import generation_eos_ids
from serving.engine.sampling import filtered_logits


def _gen(engine, prompt, **kw):
    return engine.generate([prompt], SamplingParams(**kw))[0].outputs[0]


def test_seeded_sampling_reproduces_and_seeds_differ(maverick_engine, prompts):
    p = prompts(20, seed=1)
    a = _gen(maverick_engine, p, temperature=1.0, max_tokens=30, seed=42, ignore_eos=True)
    # Run the same seed again inside a busy batch: other requests must not disturb its draws.
    outs = maverick_engine.generate([p, prompts(50, seed=2), p], [
        SamplingParams(temperature=1.0, max_tokens=30, seed=42, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=30, seed=43, ignore_eos=True)])
    assert outs[0].outputs[0].text == a.text and outs[0].outputs[0].token_ids == a.token_ids
    assert outs[2].outputs[0].token_ids != a.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(maverick_engine, prompts):
    p = prompts(30, seed=4)
    greedy = _gen(maverick_engine, p, temperature=0.0, max_tokens=10, ignore_eos=True).token_ids
    assert _gen(maverick_engine, p, temperature=0.8, top_k=1, max_tokens=10, ignore_eos=True, seed=1).token_ids \
        == greedy
    assert _gen(maverick_engine, p, temperature=0.8, top_p=1e-6, max_tokens=10, ignore_eos=True, seed=1).token_ids \
        == greedy


def test_filters_keep_exactly_the_allowed_tokens():
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0, -1.0])
    kept = filtered_logits(logits, SamplingParams(top_k=2)).isfinite()
    assert kept.tolist() == [True, False, True, False, False]
    probs = torch.softmax(logits, -1)  # 0.64, 0.087, 0.236, ...: top_p 0.8 needs the two best
    kept = filtered_logits(logits, SamplingParams(top_p=0.8)).isfinite()
    assert kept.tolist() == [True, False, True, False, False] and probs[0] < 0.8


def test_stop_string_cuts_the_text_before_it(maverick_engine, prompts):
    p = prompts(25, seed=9)
    full = _gen(maverick_engine, p, temperature=0.0, max_tokens=30, ignore_eos=True)
    stop = full.text[12:15]
    assert len(stop.strip()) == 3
    out = _gen(maverick_engine, p, temperature=0.0, max_tokens=30, ignore_eos=True, stop=["zzzz-never", stop])
    cut = full.text.index(stop)
    assert out.text == full.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert full.token_ids[:len(out.token_ids)] == out.token_ids and len(out.token_ids) < 30


def test_stop_token_ids_and_eos(maverick_tiny, maverick_engine, prompts):
    p = prompts(25, seed=10)
    full = _gen(maverick_engine, p, temperature=0.0, max_tokens=20, ignore_eos=True).token_ids
    target = full[6]
    first = full.index(target)
    out = _gen(maverick_engine, p, temperature=0.0, max_tokens=20, stop_token_ids=[target])
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop" and out.stop_reason == target

    # EOS ids come from generation_config.json; ignore_eos runs past them.
    eos = generation_eos_ids(maverick_tiny, maverick_engine.config)
    assert set(eos) == set(maverick_engine.eos_token_ids) and len(eos) == 3
    engine = LLMEngine(maverick_engine.executor, maverick_engine.tokenizer, maverick_engine.config,
                       max_model_len=512, eos_token_ids=[target])
    out = _gen(engine, p, temperature=0.0, max_tokens=20)
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop" and out.stop_reason is None
    assert _gen(engine, p, temperature=0.0, max_tokens=20, ignore_eos=True).token_ids == full


def test_logprobs_are_the_models_distribution(maverick_engine, prompts):
    out = _gen(maverick_engine, prompts(30, seed=11), temperature=0.7, seed=3, max_tokens=6, ignore_eos=True,
               logprobs=3)
    assert len(out.logprobs) == 6
    for token, position in zip(out.token_ids, out.logprobs):
        assert token in position and len(position) in (3, 4)  # the sampled token plus the top 3
        by_rank = sorted(position.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in by_rank][:3] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(by_rank, by_rank[1:]))
        assert sum(torch.tensor([lp.logprob for lp in position.values()]).exp()) <= 1.0 + 1e-5
    assert any(position[t].rank > 1 for t, position in zip(out.token_ids, out.logprobs)), "temperature 0.7 samples"


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.5, "temperature"), ("top_p", 0.0, "top_p"), ("top_k", -3, "top_k"),
    ("max_tokens", 0, "max_tokens"), ("stop", [""], "stop"), ("logprobs", 50, "logprobs"), ("n", 0, "n must be an integer from 1 to 128"),
])
def test_bad_sampling_params_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})

"""Seeded sampling works whatever device the logits are on (issue 16, item 7).

A request's generator is a CPU generator (the same seed gives the same draws on any device); the sampler draws a
seeded row on its generator's device. On CPU the whole path runs; the CUDA case runs where a GPU is present.
"""
from __future__ import annotations

import pytest

from serving.engine import LLMEngine, SamplingParams

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=8, ignore_eos=True)
OTHER = SamplingParams(temperature=0.9, seed=12, max_tokens=8, ignore_eos=True)


def _seeded_runs(engine):
    together = engine.generate(["The herd", "Once upon"], [SEEDED, OTHER])[0].outputs[0].token_ids
    alone = engine.generate("The herd", SEEDED)[0].outputs[0].token_ids
    return together, alone


def test_seeded_sampling_on_cpu_repeats_whatever_the_batch(scout_tiny):
    engine = LLMEngine.from_pretrained(scout_tiny, dtype="float32", device="cpu", max_num_seqs=4, max_model_len=64)
    together, alone = _seeded_runs(engine)
    assert together == alone and len(alone) == 8


@pytest.mark.gpu
def test_seeded_sampling_on_cuda_repeats_and_matches_cpu(scout_tiny):
    gpu = LLMEngine.from_pretrained(scout_tiny, dtype="float32", device="cuda", max_num_seqs=4, max_model_len=64)
    together, alone = _seeded_runs(gpu)
    assert together == alone
    cpu = LLMEngine.from_pretrained(scout_tiny, dtype="float32", device="cpu", max_num_seqs=4, max_model_len=64)
    assert cpu.generate("The herd", SEEDED)[0].outputs[0].token_ids == alone  # same seed, same draws

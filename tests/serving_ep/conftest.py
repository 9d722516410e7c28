"""Fixtures for the expert-parallel tests: the single-process reference on maverick-tiny, shared per session."""
from __future__ import annotations

import pytest

PROMPTS = ["The quick brown fox", "Llama herds cross the", "Expert parallel test: one two three four five six",
           "a"]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)


@pytest.fixture(scope="session")
def reference_engine(maverick_tiny):
    """The single-process engine (fp32) every expert-parallel layout must match."""
    from serving.engine import LLMEngine

    engine = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=8, max_model_len=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def reference_tokens(reference_engine):
    from serving.engine import SamplingParams

    outs = reference_engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]

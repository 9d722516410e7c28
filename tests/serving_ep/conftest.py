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


def _ep_engine(path, ep: int, tp: int):
    from serving.engine import LLMEngine

    return LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=8, max_model_len=256,
                                     expert_parallel_size=ep, tensor_parallel_size=tp, nodes=["node0", "node1"],
                                     num_cpus_per_worker=0.25)


@pytest.fixture(scope="session")
def ep2_engine(ray_cluster, maverick_tiny):
    """EP=2: two simulated nodes with one worker each."""
    engine = _ep_engine(maverick_tiny, 2, 1)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def ep4_engine(ray_cluster, maverick_tiny):
    """EP=4: two simulated nodes with two workers each (tensor parallel within the node)."""
    engine = _ep_engine(maverick_tiny, 4, 2)
    yield engine
    engine.shutdown()

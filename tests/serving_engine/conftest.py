"""Fixtures for the engine tests: transformers' reference model and herd engines on the tiny checkpoints."""
from __future__ import annotations

import pytest
import torch

from herd_testing import fp32_engine


def reference_model(path):
    """transformers' Llama 4 (the released multimodal class) in float32; returns its text `Llama4ForCausalLM`."""
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model.language_model


def prompt_ids(n: int, seed: int, low: int = 3, high: int = 2000) -> list[int]:
    """A reproducible prompt of n BPE token ids (below the special-token block)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).tolist()


@pytest.fixture(scope="session")
def reference():
    """`reference(path)`: transformers' text model for a checkpoint, loaded once per session."""
    cache = {}

    def get(path):
        if str(path) not in cache:
            cache[str(path)] = reference_model(path)
        return cache[str(path)]

    return get


@pytest.fixture(scope="session")
def prompts():
    """`prompts(n, seed)`: a reproducible prompt of n token ids."""
    return prompt_ids


@pytest.fixture(scope="module")
def scout_engine(scout_tiny):
    with fp32_engine(scout_tiny, max_num_seqs=16, max_model_len=512) as engine:
        yield engine


@pytest.fixture(scope="module")
def maverick_engine(maverick_tiny):
    with fp32_engine(maverick_tiny, max_num_seqs=16, max_model_len=512) as engine:
        yield engine

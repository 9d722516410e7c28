"""A checkpoint without tokenizer files (issue 16, item 4): the error names the missing files and the two fixes;
with `skip_tokenizer_init=True` the engine serves token ids (vLLM's option), text-free."""
from __future__ import annotations

import shutil

import pytest

from serving.engine import LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def no_tokenizer(scout_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("no-tokenizer")
    for f in scout_tiny.iterdir():
        if f.name.endswith((".safetensors", ".safetensors.index.json")) or f.name in ("config.json",
                                                                                     "generation_config.json"):
            shutil.copy(f, folder / f.name)
    return folder


def test_missing_tokenizer_files_are_named(no_tokenizer):
    with pytest.raises(ValueError) as err:
        LLMEngine.from_pretrained(no_tokenizer, dtype="float32", max_model_len=64)
    msg = str(err.value)
    assert "tokenizer.json" in msg and "tokenizer_config.json" in msg and str(no_tokenizer) in msg
    assert "skip_tokenizer_init" in msg and "sentencepiece" not in msg


def test_skip_tokenizer_init_serves_token_ids(no_tokenizer, scout_tiny):
    ids = [1, 1000, 2000, 3000]
    reference = LLMEngine.from_pretrained(scout_tiny, dtype="float32", max_model_len=64)
    expected = reference.generate([ids], GREEDY)[0].outputs[0].token_ids
    engine = LLMEngine.from_pretrained(no_tokenizer, dtype="float32", max_model_len=64, skip_tokenizer_init=True)
    out = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=1))[0]
    assert out.outputs[0].token_ids == expected and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="token ids"):
        engine.generate("a text prompt", GREEDY)
    with pytest.raises(ValueError, match="stop"):
        engine.generate([ids], SamplingParams(stop=["x"], max_tokens=3))

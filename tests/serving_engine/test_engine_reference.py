"""herd's model and engine compute exactly what transformers' Llama 4 computes (fp32, tiny checkpoints).

Prompts of 80-150 tokens cross several 32-token attention chunks on RoPE layers and pass `floor_scale` (32), so
the NoPE layers' temperature tuning changes the result; generation continues across more chunk boundaries.
"""
from __future__ import annotations

import pytest
import torch

from serving.engine import SamplingParams
from herd_testing import SlotTables

CASES = [("scout_tiny", "scout_engine"), ("maverick_tiny", "maverick_engine")]


def _herd_prompt_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every prompt position, prefilled piece by piece at chunk boundaries like the scheduler does
    (on a cache of its own: the model's engine, if any, must not use it afterwards)."""
    chunk = model.cfg.attention_chunk_size
    tables = SlotTables(model, 1, len(ids))
    out, pos = [], 0
    while pos < len(ids):
        end = min((pos // chunk + 1) * chunk, len(ids))
        batch = tables.batch([(0, ids[pos:end], pos, True)])
        batch.logits_idx_N = torch.arange(end - pos)  # every row, not just the last
        out.append(model(batch))
        pos = end
    return torch.cat(out)


@pytest.mark.parametrize("ckpt,engine", CASES)
def test_fp32_logits_match_transformers(ckpt, engine, request, reference, prompts):
    path, eng = request.getfixturevalue(ckpt), request.getfixturevalue(engine)
    ref = reference(path)
    ids = prompts(150, seed=7)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    from serving.loader import load_model

    got = _herd_prompt_logits(load_model(path, "float32"), ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    # Beyond floor_scale the NoPE temperature differs from 1: a model without it would not match.
    assert eng.config.floor_scale < 150 and not all(eng.config.rope_layers)


@pytest.mark.parametrize("ckpt,engine", CASES)
@pytest.mark.parametrize("prompt_len", [80, 150])
def test_greedy_tokens_equal_transformers_generate(ckpt, engine, prompt_len, request, reference, prompts):
    path, eng = request.getfixturevalue(ckpt), request.getfixturevalue(engine)
    ref = reference(path)
    ids = prompts(prompt_len, seed=prompt_len)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, prompt_len:].tolist()
    out = eng.generate([ids], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == eng.tokenizer.decode(expected, skip_special_tokens=True)


def test_decode_step_logits_match_transformers(maverick_tiny, maverick_engine, reference, prompts):
    """Logits of decode steps (one token at a time, read from the ring and global caches) match too."""
    ref = reference(maverick_tiny)
    ids = prompts(90, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    out = maverick_engine.generate([ids], params)[0].outputs[0]
    full = ids + out.token_ids
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([full]), use_cache=False).logits[0]
    expected_lp = torch.log_softmax(logits, dim=-1)
    for i, (token, position) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(position[token].logprob - expected_lp[len(ids) - 1 + i, token].item()) < 1e-4


def test_text_only_causal_lm_layout(maverick_tiny, tmp_path, reference, prompts):
    """A `Llama4ForCausalLM` checkpoint (no `language_model.` prefix) loads and gives the same logits."""
    from serving.loader import load_model

    ref = reference(maverick_tiny)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, "float32")
    ids = prompts(70, seed=5)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    assert (_herd_prompt_logits(model, ids) - expected).abs().max().item() < 1e-4

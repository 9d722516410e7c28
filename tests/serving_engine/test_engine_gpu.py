"""On a CUDA GPU the engine gives transformers' greedy tokens too (skipped on CPU-only machines)."""
from __future__ import annotations

import pytest
import torch

from serving.engine import LLMEngine, SamplingParams


@pytest.mark.gpu
@pytest.mark.parametrize("ckpt", ["scout_tiny", "maverick_tiny"])
def test_cuda_greedy_equals_transformers(ckpt, request, reference, prompts):
    path = request.getfixturevalue(ckpt)
    ref = reference(path).to("cuda")
    engine = LLMEngine.from_pretrained(path, dtype="float32", device="cuda", max_num_seqs=4, max_model_len=256)
    batch = [prompts(n, seed=n) for n in (120, 7, 64)]
    outs = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for ids, out in zip(batch, outs):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([ids], device="cuda"), max_new_tokens=40, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == expected
    ref.to("cpu")

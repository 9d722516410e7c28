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


@pytest.mark.gpu
def test_cuda_paged_cache_prefix_hits_and_preemption_stay_exact(maverick_tiny, reference, prompts):
    """The paged-cache exactness set on the GPU: shared-prefix requests served from cached blocks, a pool small
    enough to preempt, and every token and fp32 log-probability equal to transformers (within 1e-4).
    Run it where a GPU is at hand: `pytest -m gpu tests/serving_engine/test_engine_gpu.py`."""
    cfg_layers = reference(maverick_tiny).config
    per_layer = 2 * cfg_layers.num_key_value_heads * cfg_layers.head_dim * 4
    ref = reference(maverick_tiny).to("cuda")
    engine = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", device="cuda", max_num_seqs=8,
                                       max_model_len=256, mean_sequence_tokens=96,
                                       kv_cache_memory_bytes=(16 + 6) * 16 * per_layer + 4 * 16 * per_layer * 3)
    system = prompts(100, seed=90)
    asks = [system + prompts(10, seed=91 + i) for i in range(5)]
    engine.generate(asks[:1], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))  # cache the prefix
    outs = engine.generate(asks, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logprobs=0))
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    for ids, out in zip(asks, outs):
        got = out.outputs[0]
        with torch.no_grad():
            expected = ref.generate(torch.tensor([ids], device="cuda"), max_new_tokens=60, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            lp = torch.log_softmax(ref(input_ids=torch.tensor([ids + expected], device="cuda"),
                                       use_cache=False).logits[0].float(), dim=-1)
        assert got.token_ids == expected
        for i, (token, position) in enumerate(zip(got.token_ids, got.logprobs)):
            assert abs(position[token].logprob - lp[len(ids) - 1 + i, token].item()) < 1e-4
    ref.to("cpu")


@pytest.mark.gpu
def test_cuda_n_samples_fork_and_scored_prompts(maverick_tiny, prompts):
    """n greedy samples fork on the device (the partial block copied with CUDA index_copy) and each equals the
    single greedy request (a bad copy would change the later samples); a scored prompt's log-probabilities, every
    row of a piece at once, equal the CPU engine's."""
    cuda = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", device="cuda", max_num_seqs=8, max_model_len=256)
    ids = prompts(45, seed=95)  # a partial last block
    (greedy,) = cuda.generate([ids], SamplingParams(n=3, temperature=0.0, max_tokens=20, ignore_eos=True))
    (one,) = cuda.generate([ids], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in greedy.outputs] == [one.outputs[0].token_ids] * 3
    cpu = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=8, max_model_len=256)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    (a,), (b,) = cuda.generate([ids], params), cpu.generate([ids], params)
    assert max(abs(pa[t].logprob - pb[t].logprob) for pa, pb, t in
               zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], ids[1:])) < 1e-4

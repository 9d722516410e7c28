"""The paged KV cache: blocks sized from a budget, allocated on demand, chunked layers keeping only the current
chunk, prefix caching (exact against transformers), preemption under memory pressure, every block returned."""
from __future__ import annotations

import pytest
import torch

from llama4.config import TextConfig
from llama4.sizing import kv_bytes_per_token
from serving.engine import LLMEngine, SamplingParams
from serving.engine.kv_cache import CHUNKED, GLOBAL, plan_kv_cache

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_the_budget_decides_the_blocks(maverick_tiny):
    cfg = TextConfig.from_pretrained(maverick_tiny)  # 3 chunked layers (chunk 32), 1 global
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, fp32
    # No budget: the memory a static cache reserved (max_num_seqs full sequences), handed out block by block.
    plan = plan_kv_cache(cfg, 256, torch.float32, max_num_seqs=4)
    assert (plan.global_blocks, plan.chunked_blocks) == (4 * 16, 4 * 2)
    assert plan.total_bytes == 4 * kv_bytes_per_token(cfg, "fp32").sequence_bytes(256)
    # A budget: one whole max_model_len sequence first, the rest split as 2048-token (here: 256) sequences need.
    one = 16 * 16 * per_layer * 1 + 2 * 16 * per_layer * 3
    plan = plan_kv_cache(cfg, 256, torch.float32, max_num_seqs=64, memory_bytes=3.5 * one)
    assert (plan.global_blocks, plan.chunked_blocks) == (3 * 16, 3 * 2) and plan.total_bytes == 3 * one
    assert plan.capacity_tokens == 3 * 256 and plan.blocks_for(40) == {GLOBAL: 3, CHUNKED: 1}
    assert "48 blocks for 1 global layers (768 tokens), 6 for 3 chunked layers" in plan.describe()
    with pytest.raises(ValueError, match="kv_cache_memory_bytes .* raise the budget or lower max_model_len"):
        plan_kv_cache(cfg, 256, torch.float32, max_num_seqs=4, memory_bytes=one - 1)
    with pytest.raises(ValueError, match=r"block_size \(24\) must divide the model's attention_chunk_size \(32\)"):
        plan_kv_cache(cfg, 256, torch.float32, max_num_seqs=4, block_size=24)


@pytest.fixture(scope="module")
def engine(maverick_tiny):
    eng = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=8, max_model_len=256)
    yield eng
    eng.shutdown()


def _reference(reference, path, ids, n):
    with torch.no_grad():
        out = reference(path).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)[0, len(ids):].tolist()
        logits = reference(path)(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0]
    return out, torch.log_softmax(logits, dim=-1)


def test_a_shared_prefix_is_served_from_cached_blocks_exactly(engine, maverick_tiny, reference, prompts):
    """Later requests reuse the first one's blocks (global up to the hit, chunked from the hit's chunk start) and
    still give transformers' greedy tokens and fp32 log-probabilities."""
    system = prompts(120, seed=40)  # crosses the 32-token chunks 3 times
    asks = [system + prompts(20, seed=41 + i) for i in range(3)]
    params = SamplingParams(max_tokens=20, logprobs=0, **GREEDY)
    hits0, computed0 = engine.stats().prefix_cache_hits, engine.stats().prompt_tokens_computed
    first = engine.generate([asks[0]], params)[0]
    assert engine.stats().prefix_cache_hits == hits0  # nothing cached yet
    later = engine.generate(asks[1:], params)
    # 7 full blocks (112 tokens) of the shared 120: their chunk starts at 96, so blocks [96, 112) are hit too.
    assert engine.stats().prefix_cache_hits - hits0 == 2 * 112
    assert engine.stats().prompt_tokens_computed - computed0 == 140 + 2 * (140 - 112)
    for ids, out in zip(asks, [first, *later]):
        want, lp = _reference(reference, maverick_tiny, ids, 20)
        got = out.outputs[0]
        assert got.token_ids == want
        for i, (token, position) in enumerate(zip(got.token_ids, got.logprobs)):
            assert abs(position[token].logprob - lp[len(ids) - 1 + i, token].item()) < 1e-4
    assert engine.kv.blocks_in_use() == {GLOBAL: 0, CHUNKED: 0}  # finished: all returned (kept only as cache)


def test_chunked_layers_hold_only_the_current_chunk(engine, prompts):
    engine.add_request("grow", prompts(40, seed=50), SamplingParams(max_tokens=60, **GREEDY))
    seq = engine._requests["grow"].seq_id
    seen = set()
    while engine.has_unfinished_requests():
        engine.step()
        if engine.kv.holds(seq):
            req = engine._requests["grow"]
            n = req.num_computed
            used = engine.kv.blocks_in_use()
            assert used[GLOBAL] == -(-n // 16)  # every token's block on the global layer
            assert used[CHUNKED] == -(-(n - (n - 1) // 32 * 32) // 16)  # only the current chunk's
            seen.add(used[CHUNKED])
    assert seen == {1, 2}
    assert engine.kv.blocks_in_use() == {GLOBAL: 0, CHUNKED: 0}


def test_cache_salt_and_prompt_logprobs_get_no_hit(engine, prompts):
    ids = prompts(70, seed=60)
    params = SamplingParams(max_tokens=2, **GREEDY)
    engine.generate([ids], params)
    for salt, hit in (("tenant-b", 0), ("tenant-b", 64), (None, 64)):  # unsalted: the first run's blocks
        before = engine.stats().prefix_cache_hits
        engine.add_request(f"salt-{salt}-{hit}", ids, params, cache_salt=salt)
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.stats().prefix_cache_hits - before == hit, salt
    before = engine.stats().prefix_cache_hits
    engine.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1, **GREEDY))  # every prompt token scored
    assert engine.stats().prefix_cache_hits == before


def test_preemption_under_a_small_pool_gives_the_same_tokens(maverick_tiny, prompts):
    asks = [prompts(50, seed=70 + i) for i in range(5)]
    params = SamplingParams(max_tokens=60, **GREEDY)
    roomy = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=8, max_model_len=256)
    want = [o.outputs[0].token_ids for o in roomy.generate(asks, params)]
    cfg = roomy.config
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    # Room for one 256-token sequence plus a little: 5 sequences growing to 110 tokens cannot all stay.
    tight = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=8, max_model_len=256,
                                      kv_cache_memory_bytes=(16 + 6) * 16 * per_layer + (2 + 2) * 16 * per_layer * 3,
                                      mean_sequence_tokens=96, enable_prefix_caching=False)
    assert tight.kv.plan.global_blocks < 5 * 7
    got = [o.outputs[0].token_ids for o in tight.generate(asks, params)]
    assert got == want
    assert tight.stats().num_preemptions > 0
    assert tight.kv.blocks_in_use() == {GLOBAL: 0, CHUNKED: 0}


def test_abort_returns_every_block_and_a_request_that_can_never_fit_is_refused(maverick_tiny, prompts):
    cfg = TextConfig.from_pretrained(maverick_tiny)
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    eng = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=4, max_model_len=128,
                                    kv_cache_memory_bytes=8 * 16 * per_layer + 2 * 16 * per_layer * 3)
    assert eng.kv.plan.capacity_tokens == 128  # a budget always holds one max_model_len sequence...
    with pytest.raises(ValueError, match=r"prompt has 128 tokens but max_model_len is 128"):
        eng.add_request("too-long", prompts(128, seed=1), SamplingParams(max_tokens=1))
    # ...so only a pool smaller than that (an expert-parallel node's share, say) meets this refusal, with numbers.
    assert eng.kv.never_fits(129) == ("a sequence of 129 tokens needs 9 KV-cache blocks of 16 tokens for the global "
                                      "layers but the whole cache holds 8 (128 tokens)")
    assert eng.kv.never_fits(128) is None
    for i in range(3):
        eng.add_request(f"a{i}", prompts(30, seed=80 + i), SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(5):
        eng.step()
    assert eng.kv.blocks_in_use()[GLOBAL] > 0
    eng.abort_request(["a0", "a1", "a2"])
    eng.step()
    assert eng.kv.blocks_in_use() == {GLOBAL: 0, CHUNKED: 0} and not eng.has_unfinished_requests()

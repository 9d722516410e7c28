"""`SamplingParams(n=...)`: one prompt, n samples. The prompt is computed once; the other samples fork from it
(full blocks shared, the partial last block copied on the device) and sample their first token from the same
logits. Sample i with seed s equals a single request with seed s + i, token for token."""
from __future__ import annotations

import pytest

from serving.engine import LLMEngine, SamplingParams
from serving.engine.kv_cache import CHUNKED, GLOBAL
from serving.engine.params import sample_seed

SAMPLED = dict(max_tokens=12, ignore_eos=True, logprobs=2)  # temperature 1: the seeds decide


@pytest.fixture(scope="module")
def engine(maverick_tiny):
    eng = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=8, max_model_len=256)
    yield eng
    eng.shutdown()


def _singles(engine, ids, seed, n, **kw):
    return [o.outputs[0] for o in engine.generate([ids] * n, [SamplingParams(seed=sample_seed(seed, i), **kw)
                                                              for i in range(n)])]


def _assert_same(got, want):
    assert got.token_ids == want.token_ids
    for token, a, b in zip(got.token_ids, got.logprobs, want.logprobs):
        assert abs(a[token].logprob - b[token].logprob) < 1e-5


@pytest.mark.parametrize("length", [45, 48])  # a partial last block (copied), and whole blocks only
def test_n_samples_equal_single_requests_with_derived_seeds_and_the_prompt_runs_once(engine, prompts, length):
    ids = prompts(length, seed=300 + length)
    s0 = engine.stats()
    engine.add_request("four", ids, SamplingParams(n=4, seed=11, **SAMPLED))
    req = engine._requests["four"]
    while not req.samples[-1].num_generated:  # the prompt (a piece per 32-token chunk), then four first tokens
        engine.step()
    assert [r.num_generated for r in req.samples] == [1, 1, 1, 1]
    used = engine.kv.blocks_in_use()
    partial = length % 16 != 0
    # Global layers: the prompt's full blocks once, plus each sample's own copy of the partial one. Chunked layers
    # (chunk 32): the current chunk's blocks, likewise.
    assert used[GLOBAL] == length // 16 + (4 if partial else 0)
    assert used[CHUNKED] == (length - 32) // 16 + (4 if partial else 0)
    while engine.has_unfinished_requests():
        out = engine.step()
    (out,) = out
    s1 = engine.stats()
    assert s1.prompt_tokens_computed - s0.prompt_tokens_computed == length  # computed once for four samples
    assert s1.prefix_cache_queries - s0.prefix_cache_queries == length  # one admission
    assert out.finished and [o.index for o in out.outputs] == [0, 1, 2, 3]
    for got, want in zip(out.outputs, _singles(engine, ids, 11, 4, **SAMPLED)):
        _assert_same(got, want)
    assert len({tuple(o.token_ids) for o in out.outputs}) == 4  # four seeds, four different samples
    assert engine.kv.blocks_in_use() == {GLOBAL: 0, CHUNKED: 0}


def test_samples_without_room_to_fork_queue_and_reuse_the_cached_prefix(maverick_tiny, prompts):
    """max_num_seqs=2: one sample forks, the other two wait like new requests; their prompts come from the
    prefix cache but for the partial last block, and they still equal the single requests."""
    eng = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=2, max_model_len=256)
    ids = prompts(45, seed=310)
    before = eng.stats().prompt_tokens_computed
    (out,) = eng.generate([ids], SamplingParams(n=4, seed=-3, **SAMPLED))
    assert eng.stats().prompt_tokens_computed - before == 45 + 2 * (45 - 32)
    for got, want in zip(out.outputs, _singles(eng, ids, -3, 4, **SAMPLED)):
        _assert_same(got, want)
    assert eng.kv.blocks_in_use() == {GLOBAL: 0, CHUNKED: 0}
    eng.shutdown()


def test_streamed_samples_each_end_and_the_request_ends_once(engine, prompts):
    """Deltas of the samples interleave by `index`; each sample's last has its finish_reason, each sample's first
    carries the prompt's log-probabilities (echo), and only the request's very last delta is `finished`."""
    ids = prompts(40, seed=320)
    engine.add_request("echo", ids, SamplingParams(n=3, seed=5, max_tokens=4, prompt_logprobs=1, logprobs=0,
                                                   ignore_eos=True))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step_deltas()
    assert {d.request_id for d in deltas} == {"echo"} and [d.finished for d in deltas][-1]
    assert sum(d.finished for d in deltas) == 1
    for i in range(3):
        mine = [d for d in deltas if d.index == i]
        assert [d.finish_reason for d in mine].count("length") == 1 and mine[-1].finish_reason == "length"
        assert sum(len(d.new_token_ids) for d in mine) == 4
        firsts = [d.prompt_logprobs for d in mine if d.prompt_logprobs is not None]
        assert len(firsts) == 1 and len(firsts[0]) == 40
        assert [None if p is None else sorted(p) for p in firsts[0]] == \
            [None if p is None else sorted(p) for p in [d.prompt_logprobs for d in deltas if d.prompt_logprobs][0]]
    # The scored prompt was computed once, then shared: the same values in every sample.
    (ref,) = engine.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1))
    got = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
    for pos in range(1, 40):
        want = ref.prompt_logprobs[pos][ids[pos]].logprob
        assert all(abs(g[pos][ids[pos]].logprob - want) < 1e-5 for g in got)


@pytest.mark.parametrize("when", ["before the prompt", "while decoding"])
def test_abort_ends_every_sample_and_returns_every_block(engine, prompts, when):
    engine.add_request("stop-me", prompts(45, seed=330), SamplingParams(n=4, max_tokens=50, ignore_eos=True))
    if when == "while decoding":
        for _ in range(3):
            engine.step()
        assert len(engine.scheduler.running) == 4
    engine.abort_request("stop-me")
    deltas = engine.step_deltas()
    assert sorted(d.index for d in deltas) == [0, 1, 2, 3] and {d.finish_reason for d in deltas} == {"abort"}
    assert [d.finished for d in deltas] == [False, False, False, True]
    assert not engine.has_unfinished_requests() and engine.kv.blocks_in_use() == {GLOBAL: 0, CHUNKED: 0}


def test_n_is_validated():
    assert sample_seed(2 ** 64 - 1, 2) == 1 and sample_seed(None, 3) is None and sample_seed(7, 0) == 7
    for bad in (0, 129, 2.0, True):
        with pytest.raises(ValueError, match="n must be an integer from 1 to 128"):
            SamplingParams(n=bad)


def test_samples_preempted_in_a_small_pool_still_equal_single_requests(maverick_tiny, prompts):
    """A pool too small for four growing samples (2 chunked-layer blocks): one sample forks, two find no block for
    their copy and queue, and the newest are preempted as they grow and recomputed from the prefix cache; every
    sample still equals the single request with its seed, and every block comes back."""
    from llama4.config import TextConfig

    cfg = TextConfig.from_pretrained(maverick_tiny)
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    tight = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=8, max_model_len=256, mean_sequence_tokens=96,
                                      kv_cache_memory_bytes=(16 + 5) * 16 * per_layer + (2 + 2) * 16 * per_layer * 3)
    ids = prompts(45, seed=340)
    kw = dict(max_tokens=70, ignore_eos=True, logprobs=0)
    (out,) = tight.generate([ids], SamplingParams(n=4, seed=8, **kw))
    assert tight.stats().num_preemptions > 0
    roomy = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=8, max_model_len=256)
    for got, want in zip(out.outputs, _singles(roomy, ids, 8, 4, **kw)):
        _assert_same(got, want)
    assert tight.kv.blocks_in_use() == {GLOBAL: 0, CHUNKED: 0}
    tight.shutdown()
    roomy.shutdown()


def test_fork_shares_full_blocks_copies_the_partial_one_and_lets_go_of_its_source(maverick_tiny):
    """The block manager alone: what a fork holds, the copy it asks for, and that the copy's source is held until
    the copy ran (`copies_done`) or the sample is freed (preempted before its first step); a fork without a free
    block takes nothing."""
    import torch

    from llama4.config import TextConfig
    from serving.engine.kv_cache import KVCacheManager, plan_kv_cache

    plan = plan_kv_cache(TextConfig.from_pretrained(maverick_tiny), 256, torch.float32, max_num_seqs=2)
    assert (plan.global_blocks, plan.chunked_blocks) == (32, 4)
    kv = KVCacheManager(plan)
    for parent, child in ((1, 2), (3, 4)):
        ids = list(range(100 * parent, 100 * parent + 45))  # 2 full blocks, a partial one; chunk [32, 64) has it
        assert kv.admit(parent, ids) == 0 and kv.grow(parent, 45)
        kv.computed(parent, ids, 45)
        assert kv.fork(parent, child, 45)
    (_, g1, cs1, c1), (_, g2, cs2, c2) = kv.tables(1), kv.tables(2)
    assert g2[:2] == g1[:2] and len(g2) == 3 and g2[2] not in g1 and cs1 == cs2 == 32
    assert len(c1) == len(c2) == 1 and c1 != c2
    assert kv.pending_copies(2) == [(GLOBAL, g1[2], g2[2]), (CHUNKED, c1[0], c2[0])]
    assert kv.blocks_in_use() == {GLOBAL: 8, CHUNKED: 4}  # per prompt: 3 + the child's copy; chunked 1 + 1
    kv.free(1)  # the parent finishes first: its partial blocks stay held as the pending copy's sources
    assert kv.blocks_in_use() == {GLOBAL: 8, CHUNKED: 4}
    kv.free(2)  # preempted before its first step: the sources go with it
    assert kv.blocks_in_use() == {GLOBAL: 4, CHUNKED: 2}
    kv.copies_done(4)  # the copy ran: the sources are the parent's alone again
    kv.free(3)
    assert kv.blocks_in_use() == {GLOBAL: 3, CHUNKED: 1} and kv.pending_copies(4) == []
    assert kv.admit(5, list(range(500, 545))) == 0 and kv.grow(5, 64)  # two more chunked blocks
    assert kv.admit(6, list(range(600, 645))) == 0 and kv.grow(6, 45)  # the last one
    before = kv.blocks_in_use()
    assert not kv.fork(6, 7, 45) and not kv.holds(7) and kv.blocks_in_use() == before

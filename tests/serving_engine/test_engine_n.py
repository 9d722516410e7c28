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

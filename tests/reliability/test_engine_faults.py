"""One request must not take a replica down (issue 16, item 1).

A tiny temperature behaves as greedy (vLLM treats < 1e-5 as greedy); an exception while sampling or finishing one
request fails that request alone; an exception in a batch's forward pass fails that step's requests and the loop
keeps serving; only a dead device or worker group stops the engine; the loop's heartbeat says it is alive.
Faults are injected by replacing one function of the real engine, as a broken kernel or device would behave.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from serving.engine import AsyncLLMEngine, LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(scout_tiny):
    eng = LLMEngine.from_pretrained(scout_tiny, dtype="float32", max_num_seqs=4, max_model_len=64)
    yield eng
    eng.shutdown()


@pytest.fixture
def async_engine(scout_tiny):
    eng = AsyncLLMEngine(LLMEngine.from_pretrained(scout_tiny, dtype="float32", max_num_seqs=4, max_model_len=64))
    yield eng
    eng.shutdown()


async def _run(eng, rid, prompt, params):
    return [d async for d in eng.add_request(rid, prompt, params)]


@pytest.mark.parametrize("temperature", [1e-40, 1e-12])
def test_a_tiny_temperature_is_greedy(engine, temperature):
    expected = engine.generate("The herd", GREEDY)[0].outputs[0]
    out = engine.generate("The herd", SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected.token_ids
    assert SamplingParams(temperature=temperature).greedy


def test_a_sampling_failure_fails_that_request_only(engine, monkeypatch):
    import serving.engine.sampling as sampling

    real = sampling.sample_row

    def sample_row(logits_V, params, generator):
        if params.seed == 666:  # a row whose distribution the sampler cannot use
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits_V, params, generator)

    monkeypatch.setattr(sampling, "sample_row", sample_row)
    expected = engine.generate("The herd", GREEDY)[0].outputs[0]
    poisoned = SamplingParams(temperature=0.8, seed=666, max_tokens=6)
    outs = engine.generate(["The herd", "Once upon"], [GREEDY, poisoned])
    assert outs[0].outputs[0].token_ids == expected.token_ids and outs[0].outputs[0].finish_reason == "length"
    assert outs[1].outputs[0].finish_reason == "error" and "sampling failed" in outs[1].outputs[0].error
    assert not engine.has_unfinished_requests()
    assert engine.generate("The herd", GREEDY)[0].outputs[0].token_ids == expected.token_ids


def test_a_failing_forward_fails_that_step_and_the_loop_keeps_serving(async_engine):
    executor = async_engine.engine.executor
    real = executor.execute
    calls = {"n": 0}

    def execute(chunks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a kernel failed on this batch")
        return real(chunks)

    executor.execute = execute

    async def main():
        first = await _run(async_engine, "a", "The herd", GREEDY)
        after = await asyncio.gather(*(_run(async_engine, f"b{i}", "Once upon", GREEDY) for i in range(2)))
        return first, after

    try:
        first, after = asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        executor.execute = real
    assert first[-1].finish_reason == "error" and "a kernel failed" in first[-1].error
    assert [d[-1].finish_reason for d in after] == ["length", "length"]
    assert async_engine.dead_reason is None


def test_the_loop_heartbeat_advances_while_idle(async_engine):
    first = async_engine.last_heartbeat
    time.sleep(1.2)
    assert async_engine.last_heartbeat > first
    assert time.monotonic() - async_engine.last_heartbeat < 1.0

"""AsyncLLMEngine streams the same tokens as the synchronous engine, aborts, and bounds its waiting queue."""
from __future__ import annotations

import asyncio

import pytest

from serving.engine import AsyncLLMEngine, LLMEngine, SamplingParams
from serving.engine.errors import QueueFullError


@pytest.fixture(scope="module")
def async_engine(maverick_tiny):
    engine = AsyncLLMEngine(LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=4, max_model_len=256),
                            max_waiting_requests=3)
    yield engine
    engine.shutdown()


async def _collect(engine, rid, prompt, params):
    return [d async for d in engine.add_request(rid, prompt, params)]


def test_streamed_deltas_add_up_to_the_synchronous_result(async_engine, maverick_engine, prompts):
    params = [SamplingParams(temperature=0.0, max_tokens=12 + i, ignore_eos=True) for i in range(3)]
    ps = [prompts(20 + 30 * i, seed=i) for i in range(3)]
    expected = maverick_engine.generate(ps, params)

    async def main():
        return await asyncio.gather(*(_collect(async_engine, f"s{i}", ps[i], params[i]) for i in range(3)))

    for deltas, exp in zip(asyncio.run(main()), expected):
        assert [t for d in deltas for t in d.new_token_ids] == exp.outputs[0].token_ids
        assert "".join(d.new_text for d in deltas) == exp.outputs[0].text
        assert [d.finish_reason for d in deltas][-1] == "length"
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].num_prompt_tokens == len(exp.prompt_token_ids)
        assert deltas[0].first_token_time >= deltas[0].arrival_time


def test_stop_string_is_never_streamed(async_engine, maverick_engine, prompts):
    p = prompts(25, seed=9)
    full = maverick_engine.generate([p], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    stop = full.outputs[0].text[12:15]
    deltas = asyncio.run(_collect(async_engine, "stop", p, SamplingParams(temperature=0.0, max_tokens=30,
                                                                           stop=stop, ignore_eos=True)))
    streamed = "".join(d.new_text for d in deltas)
    assert streamed == full.outputs[0].text[:full.outputs[0].text.index(stop)]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop


def test_abort_ends_the_stream_and_frees_the_slot(async_engine, prompts):
    async def main():
        stream = async_engine.add_request("ab", prompts(30, seed=2),
                                          SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        deltas = []
        async for d in stream:
            deltas.append(d)
            if len(deltas) == 3:
                await async_engine.abort("ab")
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "abort" and len(deltas) < 200
    assert async_engine.stats().kv_cache_usage == 0.0


def test_full_waiting_queue_is_refused(maverick_tiny, prompts):
    engine = AsyncLLMEngine(LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=1, max_model_len=256),
                            max_waiting_requests=2)
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def main():
        streams = [engine.add_request("q0", prompts(10, seed=0), params)]
        running = asyncio.ensure_future(streams[0].__anext__())
        await running  # q0 holds the only slot now
        with pytest.raises(ValueError, match="prompt is empty"):
            engine.add_request("bad", [], params)
        for i in (1, 2):
            streams.append(engine.add_request(f"q{i}", prompts(10, seed=i), params))
        with pytest.raises(QueueFullError, match="max_waiting_requests=2"):
            engine.add_request("q3", prompts(10, seed=3), params)
        for rid in ("q0", "q1", "q2"):
            await engine.abort(rid)
        return [[d async for d in s] for s in streams]

    try:
        results = asyncio.run(main())
        assert all(r[-1].finish_reason == "abort" for r in results if r)
    finally:
        engine.shutdown()

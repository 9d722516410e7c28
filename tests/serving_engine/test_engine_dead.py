"""When the engine loop cannot go on (an expert-parallel group that cannot be rebuilt), every open stream
fails with EngineDeadError, new requests are refused at once, and `dead_reason` says why (Serve's health check
reads it to replace the replica)."""
from __future__ import annotations

import asyncio

import pytest

from serving.engine import AsyncLLMEngine, LLMEngine, SamplingParams
from serving.engine.errors import EngineDeadError, WorkerDiedError


def test_a_dead_loop_fails_streams_and_refuses_requests(scout_tiny):
    engine = AsyncLLMEngine(LLMEngine.from_pretrained(scout_tiny, dtype="float32", max_num_seqs=2,
                                                      max_model_len=64))

    def broken_step(chunks):
        raise WorkerDiedError("worker 1 died")

    def broken_rebuild():
        raise RuntimeError("placement group lost: cannot rebuild the workers")

    async def run():
        assert engine.dead_reason is None
        async for _ in engine.add_request("ok", "hello", SamplingParams(max_tokens=2, temperature=0.0)):
            pass
        engine.engine.executor.execute = broken_step  # a worker died, and it cannot be replaced
        engine.engine.executor.rebuild = broken_rebuild
        with pytest.raises(EngineDeadError, match="placement group lost"):
            async for _ in engine.add_request("doomed", "hello", SamplingParams(max_tokens=2)):
                pass
        with pytest.raises(EngineDeadError, match="the engine loop stopped"):
            engine.add_request("late", "hello", SamplingParams(max_tokens=2))

    try:
        asyncio.run(asyncio.wait_for(run(), timeout=60))
        assert isinstance(engine.dead_reason, RuntimeError)
    finally:
        engine.shutdown()

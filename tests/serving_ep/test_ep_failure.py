"""A worker killed mid-generation: the requests in flight end with a clear error, the group is rebuilt, the next
request gets the right answer, routing statistics survive, and nothing waits on the dead worker."""
from __future__ import annotations

import time

import pytest
import ray
import torch

from serving.engine import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.slow
def test_killed_worker_fails_in_flight_requests_then_recovers(ep2_engine, prompts, reference_tokens):
    engine = ep2_engine
    engine.add_request("victim-a", prompts[0], GREEDY)
    engine.add_request("victim-b", prompts[1], GREEDY)
    for _ in range(3):  # prefill and a couple of decode steps: both sequences are in flight
        engine.step()
    counts_before = engine.routed_token_counts()
    old_pids = {p["pid"] for p in engine.executor.placement}
    ray.kill(engine.executor.group.workers[1], no_restart=True)

    t0 = time.monotonic()
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    # The failed step, new workers and the reload; a generous bound for a loaded 2-core host: it only has to
    # show that nothing waits forever. That the death was seen at once, not after a collective timed out, is
    # in the message: "died", not "did not answer within".
    assert time.monotonic() - t0 < 180
    assert set(finished) == {"victim-a", "victim-b"}
    for out in finished.values():
        assert out.finish_reason == "error"
        assert "expert-parallel worker 1" in out.error and "died" in out.error

    new_pids = {p["pid"] for p in engine.executor.placement}
    assert not new_pids & old_pids  # every worker was replaced, process groups formed afresh
    # Routing statistics outlive the workers that counted them (the fixture syncs them every step).
    assert torch.equal(engine.routed_token_counts(), counts_before)
    outs = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference_tokens
    fed = sum(len(engine.tokenizer.encode(p)) + GREEDY.max_tokens - 1 for p in prompts)  # last token isn't fed
    assert (engine.routed_token_counts() - counts_before).sum(1).tolist() == [fed] * len(counts_before)

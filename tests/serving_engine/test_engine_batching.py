"""Continuous batching gives each sequence exactly the tokens it gets alone, within the scheduler's limits."""
from __future__ import annotations

import pytest

from serving.engine import LLMEngine, SamplingParams


class RecordingExecutor:
    """The real in-process executor, recording what each step ran (to check the scheduler's limits)."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, chunks):
        self.steps.append([(c.seq_id, len(c.token_ids), c.start_pos) for c in chunks])
        return self.inner.execute(chunks)


@pytest.mark.slow
def test_sixteen_mixed_sequences_together_equal_each_alone(maverick_tiny, prompts):
    lengths = [5, 140, 33, 64, 1, 97, 31, 32, 120, 9, 70, 45, 150, 18, 88, 2]
    batch_prompts = [prompts(n, seed=100 + i) for i, n in enumerate(lengths)]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + (i % 5) * 6, ignore_eos=True) for i in range(16)]

    alone_engine = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=1, max_model_len=256)
    alone = [alone_engine.generate([p], q)[0].outputs[0].token_ids for p, q in zip(batch_prompts, params)]

    # Fewer slots than sequences and a small token budget: requests wait, join mid-flight, and prefill in
    # pieces mixed with other sequences' decodes.
    engine = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=12, max_num_batched_tokens=64,
                                       max_model_len=256)
    recorder = RecordingExecutor(engine.executor)
    engine.executor = recorder
    together = engine.generate(batch_prompts, params)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert [len(o.outputs[0].token_ids) for o in together] == [q.max_tokens for q in params]

    assert max(sum(n for _, n, _ in step) for step in recorder.steps) <= 64
    assert max(len(step) for step in recorder.steps) <= 12
    assert any(any(n > 1 for _, n, _ in s) and any(n == 1 for _, n, _ in s) for s in recorder.steps), \
        "some step should mix prefill pieces with decodes"
    for step in recorder.steps:  # no piece crosses an attention-chunk boundary
        assert all(start // 32 == (start + n - 1) // 32 for _, n, start in step)
    assert engine.stats().kv_cache_usage == 0.0 and not engine.has_unfinished_requests()


def test_abort_frees_the_cache_slot_at_once(maverick_engine, prompts):
    engine = maverick_engine
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"abort-{i}", prompts(40, seed=i), params)
    for _ in range(4):
        engine.step()
    assert engine.stats().num_running == 3
    used = engine.stats().kv_cache_usage
    engine.abort_request("abort-1")
    assert engine.stats().kv_cache_usage == pytest.approx(used * 2 / 3)
    assert engine.stats().num_running == 2
    reported = {o.request_id: o for o in engine.step()}
    assert reported["abort-1"].finished and reported["abort-1"].outputs[0].finish_reason == "abort"
    engine.abort_request(["abort-0", "abort-2"])
    engine.step()
    assert engine.stats().kv_cache_usage == 0.0 and not engine.has_unfinished_requests()


def test_finished_requests_free_slots_for_waiting_ones(maverick_tiny, prompts):
    engine = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=2, max_model_len=128)
    outs = engine.generate([prompts(10, seed=i) for i in range(5)],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [4] * 5
    assert engine.stats().kv_cache_usage == 0.0


def test_prompt_too_long_is_refused_with_the_limit(maverick_tiny, prompts):
    engine = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=1, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len is 64"):
        engine.add_request("long", prompts(64, seed=0), SamplingParams())
    out = engine.generate([prompts(60, seed=0)], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


class DyingExecutor(RecordingExecutor):
    """The real executor, whose worker 'dies' on one chosen step (as an expert-parallel worker can)."""

    def __init__(self, inner, die_on_step: int):
        super().__init__(inner)
        self.die_on_step, self.rebuilt = die_on_step, 0

    def execute(self, chunks):
        from serving.engine.errors import WorkerDiedError

        if len(self.steps) == self.die_on_step:
            self.steps.append([])
            raise WorkerDiedError("worker 1 exited")
        return super().execute(chunks)

    def rebuild(self):
        self.rebuilt += 1
        self.inner.rebuild()


def test_worker_death_fails_running_requests_and_the_engine_continues(maverick_tiny, prompts):
    engine = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=2, max_model_len=128)
    engine.executor = DyingExecutor(engine.executor, die_on_step=3)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = engine.generate([prompts(10, seed=i) for i in range(4)], params)
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert reasons[:2] == ["error", "error"] and reasons[2:] == ["length", "length"]
    assert "worker 1 exited" in outs[0].outputs[0].error and engine.executor.rebuilt == 1
    alone = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=1, max_model_len=128)
    assert outs[3].outputs[0].token_ids == alone.generate([prompts(10, seed=3)], params)[0].outputs[0].token_ids
    assert engine.stats().kv_cache_usage == 0.0


def test_chat_messages_render_with_the_checkpoints_template(maverick_engine):
    ids = maverick_engine.apply_chat_template([{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi there"}])
    text = maverick_engine.tokenizer.decode(ids)
    assert text.startswith("<|begin_of_text|><|header_start|>system<|header_end|>")
    assert "Hi there<|eot|>" in text and text.endswith("<|header_start|>assistant<|header_end|>\n\n")
    out = maverick_engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert out.prompt_token_ids == ids and len(out.outputs[0].token_ids) == 3

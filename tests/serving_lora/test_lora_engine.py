"""The engine serving a LoRA adapter answers what transformers + PEFT answer with it, in one process and with
expert parallelism, and an adapter that does not fit is refused before any worker starts."""
from __future__ import annotations

import pytest
import torch

from serving.engine import LLMEngine, SamplingParams
from serving.lora import LoraError

PROMPTS = ["The quick brown fox", "Llama herds cross the", "adapters change answers"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def lora_engine(maverick_tiny, adapter_dir):
    engine = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=4, max_model_len=256,
                                       lora_adapter=adapter_dir)
    yield engine
    engine.shutdown()


def _peft_greedy(peft_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_and_logits_equal_peft(lora_engine, peft_model, maverick_tiny):
    base = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=4, max_model_len=256)
    try:
        base_tokens = [o.outputs[0].token_ids for o in base.generate(PROMPTS, GREEDY)]
    finally:
        base.shutdown()
    got = [o.outputs[0].token_ids for o in lora_engine.generate(PROMPTS, GREEDY)]
    want = [_peft_greedy(peft_model, lora_engine.tokenizer.encode(p), GREEDY.max_tokens) for p in PROMPTS]
    assert got == want
    assert got != base_tokens  # the adapter changes the answers, so equality above means something
    ids = lora_engine.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
    logits = lora_engine.last_token_logits([ids])[0]
    assert (logits - expected).abs().max().item() < 1e-4


def test_adapter_for_another_model_is_refused(scout_tiny, adapter_dir):
    with pytest.raises(LoraError, match="was the adapter trained on another model"):
        LLMEngine.from_pretrained(scout_tiny, dtype="float32", max_num_seqs=2, max_model_len=128,
                                  lora_adapter=adapter_dir)


@pytest.mark.slow
def test_expert_parallel_workers_merge_their_share(ray_cluster, maverick_tiny, adapter_dir, lora_engine):
    """EP=4 over the two simulated nodes, tensor parallel within each: every worker merges only its experts'
    and its shard's rows, and the answer is the single-process one."""
    want = [o.outputs[0].token_ids for o in lora_engine.generate(PROMPTS, GREEDY)]
    engine = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=4, max_model_len=256,
                                       expert_parallel_size=4, tensor_parallel_size=2, nodes=["node0", "node1"],
                                       num_cpus_per_worker=0.25, lora_adapter=adapter_dir)
    try:
        assert [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY)] == want
    finally:
        engine.shutdown()

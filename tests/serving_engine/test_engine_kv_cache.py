"""The KV cache is sized from a memory budget with llama4's sizing arithmetic; RoPE layers keep one chunk."""
from __future__ import annotations

import pytest
import torch

from llama4.config import TextConfig
from llama4.sizing import kv_bytes_per_token
from serving.engine import LLMEngine, SamplingParams
from serving.engine.kv_cache import plan_kv_cache


def test_budget_decides_the_number_of_slots(maverick_tiny):
    cfg = TextConfig.from_pretrained(maverick_tiny)
    per_seq = kv_bytes_per_token(cfg, "fp32").sequence_bytes(256)
    plan = plan_kv_cache(cfg, 256, torch.float32, max_num_seqs=64, memory_bytes=5.5 * per_seq)
    assert plan.num_slots == 5 and plan.total_bytes == 5 * per_seq
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert plan.bytes_per_token() == {"chunked_attention": per_layer, "global_attention": per_layer}
    # 3 RoPE layers keep 32 tokens each, the NoPE layer all 256.
    assert per_seq == per_layer * (3 * 32 + 1 * 256)
    assert "3 chunked layers keep <= 32 tokens" in plan.describe()
    with pytest.raises(ValueError, match="kv_cache_memory_bytes .* raise the budget or lower max_model_len"):
        plan_kv_cache(cfg, 256, torch.float32, max_num_seqs=4, memory_bytes=per_seq - 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        plan_kv_cache(cfg, 10**7, torch.float32, max_num_seqs=4)


def test_engine_allocates_what_the_plan_says(maverick_tiny, prompts):
    cfg = TextConfig.from_pretrained(maverick_tiny)
    per_seq = kv_bytes_per_token(cfg, "fp32").sequence_bytes(200)
    engine = LLMEngine.from_pretrained(maverick_tiny, max_num_seqs=16, max_model_len=200,
                                       kv_cache_memory_bytes=3 * per_seq)
    assert engine.executor.max_num_seqs == 3 and engine.scheduler.max_num_seqs == 3
    model = engine.executor.model
    allocated = sum(t.numel() * t.element_size() for layer in model.layers
                    for t in (layer.self_attn.cache_k, layer.self_attn.cache_v))
    assert allocated == 3 * per_seq
    lengths = {layer.self_attn.cache_k.shape[2] for layer in model.layers if layer.self_attn.use_rope}
    assert lengths == {32}
    # Six long requests through three slots: they queue, run, and free their slots.
    outs = engine.generate([prompts(150, seed=i) for i in range(6)],
                           SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs) and engine.stats().kv_cache_usage == 0

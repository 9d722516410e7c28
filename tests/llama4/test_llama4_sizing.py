"""The paged KV cache's block arithmetic in llama4.sizing, counted here by hand, and the engine sizing its pools with it."""
from __future__ import annotations

import pytest

from llama4.presets import get_preset
from llama4.sizing import (DEFAULT_BLOCK_SIZE, DEFAULT_MEAN_SEQUENCE_TOKENS, BlockCounts, cache_tokens, kv_bytes_per_token,
                           kv_pools, longest_sequence, peak_sequence_blocks, sequence_blocks, sequences_in_pools)

MAVERICK = kv_bytes_per_token(get_preset("maverick").text_config(), "bf16")  # 4,096 B/token/layer, 12 + 36 layers
BLOCK = 16 * 4096  # one 16-token block of one layer, bf16


def _cost(tokens: int) -> int:
    """Bytes of one Maverick sequence at its peak, counted block by block."""
    return -(-tokens // 16) * BLOCK * 12 + -(-min(tokens, 8192) // 16) * BLOCK * 36


@pytest.mark.parametrize("tokens,at_end,peak", [
    (0, (0, 0), (0, 0)),
    (1, (1, 1), (1, 1)),
    (16, (1, 1), (1, 1)),
    (17, (2, 2), (2, 2)),
    (8192, (512, 512), (512, 512)),
    (8193, (513, 1), (513, 512)),  # a new chunk: the chunked layers hold only its first block
    (131072, (8192, 512), (8192, 512)),
    (131073, (8193, 1), (8193, 512)),
])
def test_blocks_of_one_sequence(tokens, at_end, peak):
    assert sequence_blocks(MAVERICK, tokens, 16) == BlockCounts(*at_end)
    assert peak_sequence_blocks(MAVERICK, tokens, 16) == BlockCounts(*peak)


def test_a_budget_holds_one_long_sequence_then_mean_ones():
    budget = 100e9
    pools = kv_pools(MAVERICK, budget, 131072, 16, 2048)
    extra = int((budget - _cost(131072)) // (128 * BLOCK * 48))
    assert pools == BlockCounts(8192 + 128 * extra, 512 + 128 * extra)
    assert cache_tokens(MAVERICK, pools, 16) == 16 * (8192 + 128 * extra)
    assert sequences_in_pools(MAVERICK, pools, 2048, 16) == extra + 4  # the long one's 512 chunked blocks hold 4
    assert sequences_in_pools(MAVERICK, pools, 131072, 16) == (8192 + 128 * extra) // 8192
    with pytest.raises(ValueError, match=r"cannot hold one sequence of 131072 tokens \(7650410496 bytes\)"):
        kv_pools(MAVERICK, _cost(131072) - 1, 131072)


@pytest.mark.parametrize("budget", [1e6, 2e9, _cost(8192), _cost(8192) - 1, 50e9, 3e12])
def test_the_longest_sequence_a_budget_holds(budget):
    longest = longest_sequence(MAVERICK, budget)
    assert longest % 16 == 0 and _cost(longest) <= budget < _cost(longest + 16)
    assert longest_sequence(MAVERICK, budget, limit=1000) == min(longest, 1000)


def test_the_defaults_are_the_engines():
    import torch

    from serving.config import CacheConfig
    from serving.engine import kv_cache

    assert (DEFAULT_BLOCK_SIZE, DEFAULT_MEAN_SEQUENCE_TOKENS) == (kv_cache.DEFAULT_BLOCK_SIZE,
                                                                  kv_cache.DEFAULT_MEAN_SEQUENCE_TOKENS)
    c = CacheConfig(max_model_len=8192)
    assert (c.block_size, c.mean_sequence_tokens) == (DEFAULT_BLOCK_SIZE, DEFAULT_MEAN_SEQUENCE_TOKENS)
    # The engine's plan for one worker of eight (one KV head each) is a node's pools, divided by nothing.
    cfg = get_preset("maverick").text_config()
    plan = kv_cache.plan_kv_cache(cfg, 131072, torch.bfloat16, 64, memory_bytes=100e9 / 8, tensor_parallel_size=8)
    pools = kv_pools(MAVERICK, 100e9, 131072)
    assert (plan.global_blocks, plan.chunked_blocks) == (pools.global_blocks, pools.chunked_blocks)
    assert plan.capacity_tokens == cache_tokens(MAVERICK, pools, 16)

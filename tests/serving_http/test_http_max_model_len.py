"""Fast checks (no Ray) of the Serve args' max_model_len: by default what one sequence can hold, never more than
the KV cache, and said when that is below the checkpoint's context (Scout's 10M tokens cannot allocate one)."""
from __future__ import annotations

import json
import logging

import pytest

from herd.errors import UserError
from llama4.presets import get_preset
from serving.api.config import parse_args
from serving.app import build_app, max_model_len_note
from serving.config import ModelConfig

BLOCK = 16 * 2 * 8 * 128 * 2  # one 16-token block of one layer: K and V, 8 KV heads of 128, bf16


@pytest.fixture(scope="module")
def scout_config(tmp_path_factory):
    """A folder with only Scout's config.json (10,485,760-token context): build_app reads nothing else."""
    folder = tmp_path_factory.mktemp("scout-config")
    p = get_preset("scout")
    text = {**p.text, "vocab_size": p.text.get("vocab_size") or p.bpe_vocab_size + 1024}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text}))
    return folder


def _max_model_len(folder, **args) -> tuple[int, str | None]:
    a, note = parse_args({"model": str(folder), **args}).fit_max_model_len(ModelConfig.load(folder).text)
    return a.max_model_len, note


def test_without_a_budget_the_default_is_8192_and_said(scout_config, caplog):
    n, note = _max_model_len(scout_config)
    assert n == 8192
    assert note.startswith("max_model_len defaults to 8192 tokens, below the checkpoint's context (10485760): "
                           "without kv_cache_memory_bytes the KV cache is sized as max_num_seqs (8) x max_model_len")
    with caplog.at_level(logging.WARNING, logger="herd.serving.app"):
        build_app({"model": str(scout_config)})
    assert note in caplog.text
    assert max_model_len_note({"model": str(scout_config)}) == note  # what `herd serve` prints
    assert _max_model_len(scout_config, max_model_len=20000) == (20000, None)  # asked for: kept, nothing said


def test_with_a_budget_the_default_is_the_longest_sequence_it_holds(scout_config):
    # 12 global layers grow with the sequence, 36 chunked layers stop at one 8,192-token chunk (512 blocks).
    budget = 8 * 2**30
    longest = 16 * int((budget - 512 * BLOCK * 36) // (BLOCK * 12))
    n, note = _max_model_len(scout_config, kv_cache_memory_bytes=budget, dtype="bfloat16")
    assert n == longest == 150_176
    assert note.startswith(f"max_model_len defaults to {longest} tokens, below the checkpoint's context (10485760): "
                           f"the longest single sequence kv_cache_memory_bytes ({budget}, bf16 at "
                           "tensor_parallel_size 1) holds")
    # Per worker under tensor parallelism each worker keeps 1/tp of the KV heads, so its budget goes tp times as far.
    n2, _ = _max_model_len(scout_config, kv_cache_memory_bytes=budget / 2, dtype="bfloat16", expert_parallel_size=2,
                           tensor_parallel_size=2)
    assert n2 == longest
    # fp32 (dtype auto without a GPU) costs twice as much per token: the default can only be lower.
    assert _max_model_len(scout_config, kv_cache_memory_bytes=budget)[0] < longest
    # A budget that holds the whole context says nothing.
    assert _max_model_len(scout_config, kv_cache_memory_bytes=1e13, dtype="bfloat16") == (10_485_760, None)


def test_max_model_len_beyond_the_cache_or_the_context_is_refused(scout_config):
    with pytest.raises(UserError, match=r"^serve args: max_model_len \(200000\) is longer than one sequence "
                                        r"kv_cache_memory_bytes \(8589934592, bf16 at tensor_parallel_size 1\) holds "
                                        r"\(150176 tokens\); lower max_model_len to 150176 or raise "
                                        r"kv_cache_memory_bytes$"):
        build_app({"model": str(scout_config), "kv_cache_memory_bytes": 8 * 2**30, "dtype": "bfloat16",
                   "max_model_len": 200_000})
    with pytest.raises(UserError, match=r"max_model_len \(20000000\) exceeds the checkpoint's context "
                                        r"\(max_position_embeddings 10485760\); lower max_model_len"):
        build_app({"model": str(scout_config), "max_model_len": 20_000_000})
    with pytest.raises(UserError, match=r"holds 0 tokens of one sequence, fewer than 16; raise it"):
        build_app({"model": str(scout_config), "kv_cache_memory_bytes": 1000})

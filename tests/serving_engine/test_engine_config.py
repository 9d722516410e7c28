"""The one engine configuration (serving/config.py): keywords checked once, one layout rule for every source,
and an engine package that needs nothing of the expert-parallel one to run in one process."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from serving.config import EngineConfig

REPO = Path(__file__).resolve().parents[2]


def test_unknown_or_unused_keywords_are_errors_that_name_them(maverick_tiny):
    from serving.engine import LLMEngine

    with pytest.raises(TypeError, match=r"unknown keyword 'enable_prefix_cashing'"):
        LLMEngine.from_pretrained(maverick_tiny, enable_prefix_cashing=True)
    with pytest.raises(TypeError, match=r"unknown keyword 'max_num_seq'; did you mean 'max_num_seqs'\?"):
        LLMEngine.from_pretrained(maverick_tiny, max_num_seq=4)
    # Settings only the expert-parallel path reads were silently dropped in one process; now they are refused.
    with pytest.raises(ValueError, match=r"^nodes is used only with expert parallelism"):
        LLMEngine.from_pretrained(maverick_tiny, nodes=["node0"])
    with pytest.raises(ValueError, match=r"^weights is used only with expert parallelism"):
        LLMEngine.from_pretrained(maverick_tiny, weights="s3://bucket/ckpt")
    with pytest.raises(ValueError, match=r"max_model_len \(999999\) exceeds the model's max_position_embeddings"):
        LLMEngine.from_pretrained(maverick_tiny, max_model_len=999_999)


def test_config_json_is_read_once_and_handed_down(maverick_tiny):
    config = EngineConfig.from_kwargs(maverick_tiny, max_num_seqs=3, max_model_len=128)
    assert config.text.num_local_experts == 128 and config.model.raw["text_config"]["num_local_experts"] == 128
    assert (config.scheduler.max_num_seqs, config.cache.max_model_len, config.parallel.enabled) == (3, 128, False)
    default = EngineConfig.from_kwargs(maverick_tiny)
    assert default.cache.max_model_len == min(default.text.max_position_embeddings, 8192)


def test_a_single_process_engine_imports_nothing_of_expert_parallelism(maverick_tiny):
    """Run in a fresh interpreter: this test session has imported serving.expert_parallel long ago."""
    code = textwrap.dedent(f"""
        import sys
        from serving.engine import LLMEngine, SamplingParams
        engine = LLMEngine.from_pretrained({str(maverick_tiny)!r}, max_num_seqs=2, max_model_len=64)
        out = engine.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 2
        bad = sorted(m for m in sys.modules if m.startswith("serving.expert_parallel") or m == "ray")
        print("IMPORTED", bad)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "IMPORTED []" in done.stdout


def test_the_same_bad_layout_is_refused_by_the_same_rule_everywhere(maverick_tiny, tmp_path):
    """Four workers per node cannot split maverick-tiny's 2 key/value heads: the engine, the Serve args and a
    cluster file refuse it with one rule's message, each in its own field names."""
    from common.errors import UserError
    from cluster.schema import load_cluster
    from serving.app import build_app
    from serving.engine import LLMEngine

    rule = "must divide the model's num_key_value_heads (2): a node's workers split it evenly; choose a divisor of 2"
    with pytest.raises(ValueError) as engine_err:
        LLMEngine.from_pretrained(maverick_tiny, expert_parallel_size=4, tensor_parallel_size=4)
    assert str(engine_err.value) == f"tensor_parallel_size (4) {rule} (1, 2)"

    with pytest.raises(UserError) as serve_err:
        build_app({"model": str(maverick_tiny), "expert_parallel_size": 4, "tensor_parallel_size": 4})
    assert str(serve_err.value) == f"serve args: tensor_parallel_size (4) {rule} (1, 2)"

    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump({
        "name": "tiny", "provider": {"cloud": "local"},
        "node_groups": [{"name": "cpu", "gpu": "cpu", "gpus_per_node": 4, "count": 1, "cpus": 8, "ram_gib": 16}],
        "model": {"preset": "maverick-tiny", "weight_dtype": "fp32"},
        "serving": {"nodes_per_replica": 1},
    }))
    with pytest.raises(UserError) as cluster_err:
        load_cluster(cluster)
    assert str(cluster_err.value).endswith(
        f"node_groups[0].gpus_per_node: node_groups[0].gpus_per_node (4) {rule} (1, 2)")

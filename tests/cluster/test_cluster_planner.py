"""The planner's sanity anchors, its arithmetic against llama4.sizing, and fixes that really fix."""
from __future__ import annotations

import pytest

from cluster.planner import plan
from cluster.report import format_plan
from cluster.schema import parse_cluster
from llama4.presets import get_preset
from llama4.sizing import kv_bytes_per_token, param_counts


def _plan(cluster_doc, **kw):
    throughput = kw.pop("throughput", None)
    return plan(parse_cluster(cluster_doc(**kw)), throughput=throughput)


def test_maverick_fp8_fits_one_8xh100_node(cluster_doc):
    p = _plan(cluster_doc, preset="maverick", dtype="fp8")
    assert p.fits, p.reasons
    assert p.layout["expert_parallel_size"] == 8
    assert p.placement.experts_on(0, 1) == list(range(16))


def test_maverick_bf16_does_not_fit_one_node_but_fits_two(cluster_doc):
    one = _plan(cluster_doc, preset="maverick", dtype="bf16")
    assert not one.fits
    assert one.reasons[0].startswith("weights need 100.4 GB per GPU (3.5 non-expert + 96.6 routed experts + 0.2 "
                                     "vision)")
    assert "add nodes: set serving.nodes_per_replica to 2 (and node_groups[0].count to at least 2)" in one.fixes
    assert "use a smaller weight dtype: set model.weight_dtype to fp8 (fits on 1 node(s) per replica; the engine " \
           "serves bf16/fp32 only today)" in one.fixes
    assert "use bigger GPUs: node_groups[0].gpu H200-141GB fits on 1 node(s) per replica" in one.fixes
    two = _plan(cluster_doc, preset="maverick", dtype="bf16", count=2, nodes_per_replica=2)
    assert two.fits, two.reasons
    # The worked example: about 3.5 GB non-expert and 48 GB routed experts per GPU.
    assert two.per_gpu.non_expert / 1e9 == pytest.approx(3.54, abs=0.01)
    assert two.per_gpu.routed_experts / 1e9 == pytest.approx(48.3, abs=0.1)


def test_scout_int4_fits_one_h100(cluster_doc):
    p = _plan(cluster_doc, preset="scout", dtype="int4", gpus=1)
    assert p.fits, p.reasons
    assert _plan(cluster_doc, preset="scout", dtype="bf16", gpus=1).fits is False


@pytest.mark.parametrize("preset,dtype,bytes_per_param,gpus,nodes", [
    ("maverick", "bf16", 2.0, 8, 2),
    ("maverick", "fp8", None, 8, 1),
    ("scout", "bf16", 2.0, 8, 1),
    ("scout", "fp32", 4.0, 4, 1),
])
def test_memory_figures_agree_with_param_counts(cluster_doc, preset, dtype, bytes_per_param, gpus, nodes):
    p = _plan(cluster_doc, preset=preset, dtype=dtype, gpus=gpus, count=nodes, nodes_per_replica=nodes)
    counts = param_counts(get_preset(preset).text_config())
    expert_bytes = 1.0 if dtype == "fp8" else bytes_per_param  # fp8 is Meta's: experts fp8, the rest bf16
    other_bytes = 2.0 if dtype == "fp8" else bytes_per_param
    # a node's GPUs hold the non-expert weights once; all GPUs of the replica hold the experts once
    assert p.per_gpu.non_expert * gpus == pytest.approx(counts.non_expert * other_bytes, rel=0.01)
    assert p.per_gpu.routed_experts * gpus * nodes == pytest.approx(counts.routed_experts * expert_bytes, rel=0.01)
    assert p.model["params_total"] == pytest.approx(get_preset(preset).released_params["total"], rel=0.01)


def test_kv_counts_chunked_layers_up_to_the_chunk_only(cluster_doc):
    p = _plan(cluster_doc, preset="maverick", dtype="fp8", max_context_len=131072, max_concurrent_sequences=4)
    cfg = get_preset("maverick").text_config()
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16
    assert p.kv.chunked_layers == 36 and p.kv.global_layers == 12 and p.kv.chunk_size == 8192
    assert p.kv.sequence_bytes == per_layer * (36 * 8192 + 12 * 131072)
    assert p.kv.bytes_per_token_within_chunk == per_layer * 48
    assert p.kv.bytes_per_token_beyond_chunk == per_layer * 12
    # sequences per node: what the node's GPUs (8, holding one KV head each) hold together, rounded down
    node_budget = p.per_gpu.kv_budget * 8
    assert p.kv.sequences_per_node == int(node_budget // p.kv.sequence_bytes)
    # longest single sequence: the largest context (in whole 16-token blocks) whose cache fits the node's budget
    kvt = kv_bytes_per_token(cfg)
    longest = p.kv.longest_context_per_node
    assert longest % 16 == 0
    if longest < cfg.max_position_embeddings:
        assert kvt.sequence_bytes(longest) <= node_budget < kvt.sequence_bytes(longest + 16)
    assert p.kv.sequences_per_replica == p.kv.sequences_per_node
    assert p.warnings[0].startswith("weight_dtype fp8 is planned")


def test_concurrency_beyond_cache_is_a_warning_with_the_context_that_fits(cluster_doc):
    p = _plan(cluster_doc, preset="maverick", dtype="fp8", max_context_len=131072, max_concurrent_sequences=200)
    assert p.fits
    w = p.warnings[0]
    assert w.startswith(f"at full context (131072 tokens) the cache holds {p.kv.sequences_per_replica} sequences")
    cfg = get_preset("maverick").text_config()
    c = p.kv.context_for_target
    assert kv_bytes_per_token(cfg).sequence_bytes(c) * 200 <= p.per_gpu.kv_budget * 8
    assert f"all 200 fit when each is at most {c} tokens" in w


def test_too_few_nodes_fails_with_the_count_to_set(cluster_doc):
    p = _plan(cluster_doc, preset="maverick", dtype="bf16", count=1, nodes_per_replica=2)
    assert not p.fits
    assert p.reasons == ["1 replica(s) x 2 node(s) need 2 nodes but node_groups[0] (gpu) has 1"]
    assert p.fixes == ["set node_groups[0].count to 2, or lower serving.replicas to 1"]


def test_context_too_long_fix_lowers_it_to_a_context_that_fits(cluster_doc):
    doc = dict(preset="scout", dtype="int4", gpus=1, max_context_len=500_000, max_concurrent_sequences=1)
    p = _plan(cluster_doc, **doc)
    assert not p.fits
    assert p.reasons[0].startswith("the KV cache (15.97 GB per GPU) cannot hold one 500000-token sequence")
    fix = next(f for f in p.fixes if f.startswith("lower the context"))
    ctx = int(fix.split("to ")[1].split()[0])
    assert ctx == p.kv.longest_context_per_node
    assert _plan(cluster_doc, **{**doc, "max_context_len": ctx}).fits
    assert not _plan(cluster_doc, **{**doc, "max_context_len": ctx + 64}).fits
    assert "halve the cache: set model.kv_cache_dtype to fp8 (planned; the engine keeps a bf16/fp32 cache today)" \
        in p.fixes
    # Planned as asked, and said plainly: what the engine would refuse at render time.
    doc = cluster_doc(preset="scout", dtype="bf16")
    doc["model"]["kv_cache_dtype"] = "fp8"
    fp8 = plan(parse_cluster(doc))
    assert fp8.fits and fp8.kv.bytes_per_token_within_chunk * 2 == p_bf16_kv(cluster_doc)
    assert any(w.startswith("kv_cache_dtype fp8 is planned, but the herd engine keeps the KV cache in the weights' "
                            "dtype (bf16/fp32) today: herd render --target serve will refuse it") for w in fp8.warnings)
    assert "add nodes: set serving.nodes_per_replica to 2 (and node_groups[0].count to at least 2; fewer experts " \
           "per GPU leaves more cache)" in p.fixes


def p_bf16_kv(cluster_doc) -> int:
    return plan(parse_cluster(cluster_doc(preset="scout", dtype="bf16"))).kv.bytes_per_token_within_chunk


def test_the_node_fix_fits_when_applied(cluster_doc):
    p = _plan(cluster_doc, preset="maverick", dtype="bf16", gpu="A100-80GB")
    fix = next(f for f in p.fixes if f.startswith("add nodes"))
    n = int(fix.split("nodes_per_replica to ")[1].split()[0])
    assert n == 2
    assert _plan(cluster_doc, preset="maverick", dtype="bf16", gpu="A100-80GB", count=n, nodes_per_replica=n).fits


def test_cost_per_hour_and_estimate_per_million_tokens(cluster_doc):
    p = _plan(cluster_doc, preset="maverick", dtype="bf16", count=2, nodes_per_replica=2, throughput=4000)
    assert p.cost.per_hour == pytest.approx(2 * 98.0 + 0.5)
    assert p.cost.per_million_tokens == pytest.approx((2 * 98.0 + 0.5) / (4000 * 3600) * 1e6)
    assert p.cost.assumption.startswith("estimate: assumes a sustained 4000")
    doc = cluster_doc()
    del doc["node_groups"][0]["price_per_hour"]
    p = plan(parse_cluster(doc), throughput=4000)
    assert p.cost.per_hour is None and p.cost.missing_prices == ["node_groups[0] (gpu)"]


def test_redundant_experts_cost_memory_on_the_busiest_gpu(cluster_doc):
    base = _plan(cluster_doc, preset="maverick", dtype="fp8", count=3, nodes_per_replica=2)
    red = _plan(cluster_doc, preset="maverick", dtype="fp8", count=3, nodes_per_replica=2, redundant_experts=16)
    assert red.per_gpu.routed_experts == pytest.approx(base.per_gpu.routed_experts * 9 / 8)
    assert len(red.placement.copies(1, 0)) == 2 and len(red.placement.copies(1, 16)) == 1


def test_plan_json_carries_the_figures(cluster_doc):
    import json

    p = _plan(cluster_doc, preset="maverick", dtype="fp8")
    d = json.loads(p.to_json())
    assert d["fits"] is True
    assert d["per_gpu"]["routed_experts"] == p.per_gpu.routed_experts
    assert d["per_gpu"]["headroom"] == p.per_gpu.headroom
    assert d["kv"]["sequences_per_node"] == p.kv.sequences_per_node
    assert d["placement"]["workers"][1] == {"rank": 1, "node": 0, "gpu": 1, "experts": list(range(16, 32))}


def test_several_node_groups_serving_group_and_cost(cluster_doc):
    doc = cluster_doc(preset="maverick", dtype="fp8", node_group="big")
    doc["node_groups"].append({"name": "big", "gpu": "H200-141GB", "gpus_per_node": 8, "count": 1, "cpus": 180,
                               "ram_gib": 1800, "price_per_hour": 120.0})
    p = plan(parse_cluster(doc))
    assert p.fits and p.layout["node_group"] == "big" and p.layout["node_group_index"] == 1
    assert p.per_gpu.total == 143771 * 2**20
    assert p.cost.per_hour == pytest.approx(98.0 + 120.0 + 0.5)  # every group is billed, used or not


def test_memory_override_and_cpu_workers_share_node_ram(cluster_doc):
    doc = cluster_doc(preset="maverick", dtype="fp8")
    doc["node_groups"][0]["gpu_memory_gib"] = 40
    p = plan(parse_cluster(doc))
    assert p.per_gpu.total == 40 * 2**30 and not p.fits
    cpu = cluster_doc(preset="maverick-tiny", dtype="fp32", gpu="cpu", gpus=2, max_context_len=1024)
    cpu["node_groups"][0]["ram_gib"] = 8
    p = plan(parse_cluster(cpu))
    assert p.per_gpu.total == 4 * 2**30  # 8 GiB over 2 worker processes
    assert p.layout["gpus_per_node"] == 0 and p.layout["workers_per_node"] == 2
    assert "  node 0 worker 1: experts 64-127" in format_plan(p)


def test_report_text_for_a_plan_that_does_not_fit(cluster_doc):
    p = _plan(cluster_doc, preset="maverick", dtype="bf16")
    text = format_plan(p, "c.yaml")
    assert text.startswith("herd plan: test (c.yaml)\n")
    assert "  routed-expert slice      96.64 GB" in text
    assert text.splitlines()[-5] == "DOES NOT FIT" and text.splitlines()[-4].startswith("  because weights need")


def test_paged_capacity_of_maverick_bf16_on_2x8_h100():
    """The example cluster at a 131,072-token context and a 2,048-token mean: the cache's tokens per replica and the
    sequences at the mean, counted here block by block from the config's layers and bytes."""
    from pathlib import Path

    from cluster.schema import load_cluster

    repo = Path(__file__).resolve().parents[2]
    spec = load_cluster(repo / "infra/clusters/maverick-bf16-2x8.yaml")
    assert spec.serving.max_context_len == 131072 and spec.serving.mean_sequence_tokens == 2048
    p = plan(spec)
    cfg = get_preset("maverick").text_config()
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.attention_chunk_size) == (8, 128, 8192)
    global_layers = sum(1 for i in range(cfg.num_hidden_layers) if (i + 1) % 4 == 0)  # every 4th layer is NoPE
    chunked_layers = cfg.num_hidden_layers - global_layers
    assert (global_layers, chunked_layers) == (12, 36)
    per_token_layer = 2 * 8 * 128 * 2  # K and V, 8 KV heads of 128, bf16: 4,096 B
    node_budget = p.per_gpu.kv_budget * 8  # 8 GPUs, one KV head each: the node holds every token once
    block = 16 * per_token_layer  # one 16-token block of one layer
    # One whole 131,072-token sequence first: 8,192 global blocks, and one 8,192-token chunk (512 blocks) per
    # chunked layer; the rest in 2,048-token sequences (128 blocks on every layer).
    one = 8192 * block * global_layers + 512 * block * chunked_layers
    mean = 128 * block * (global_layers + chunked_layers)
    extra = int((node_budget - one) // mean)
    global_blocks = 8192 + 128 * extra
    assert p.kv.global_blocks_per_node == global_blocks
    assert p.kv.cache_tokens_per_replica == 2 * 16 * global_blocks == 2_031_616
    # Sequences of 2,048 tokens at once: the extra ones, plus what the long sequence's share holds (its 512
    # chunked blocks hold 4 of them).
    at_mean = extra + min(8192 // 128, 512 // 128)
    assert p.kv.mean_sequences_per_replica == 2 * at_mean == 872
    text = format_plan(p)
    assert (f"paged in 16-token blocks: {2 * 16 * global_blocks:,} tokens in the cache per replica "
            f"({16 * global_blocks:,} per node); {2 * at_mean:,} sequences of 2,048 tokens "
            f"(serving.mean_sequence_tokens) at once per replica ({at_mean:,} per node") in text
    # The longest single sequence is max_context_len; a node's cache could hold one up to the model's limit.
    longest = min(1_048_576, 16 * int((node_budget - 512 * block * chunked_layers) // (block * global_layers)))
    assert p.kv.longest_context_per_node == longest
    assert (f"longest single sequence 131,072 tokens (serving.max_context_len; the cache could hold one of "
            f"{longest:,} per node)") in text


def test_mean_sequence_tokens_is_checked_and_changes_the_split(cluster_doc):
    from cluster.schema import ClusterFileError

    doc = dict(preset="maverick", dtype="bf16", count=2, nodes_per_replica=2, max_context_len=131072)
    short, long_ = _plan(cluster_doc, **doc), _plan(cluster_doc, **doc, mean_sequence_tokens=131072)
    assert short.kv.mean_sequences_per_replica > 18 * long_.kv.mean_sequences_per_replica  # 872 against 46
    # Split for full-context sequences, the pools hold as many as the bytes of whole sequences say.
    assert long_.kv.mean_sequences_per_node == long_.kv.sequences_per_node
    with pytest.raises(ClusterFileError, match=r"serving.mean_sequence_tokens: 9000 exceeds serving.max_context_len "
                                               r"8192 .*; lower it or raise max_context_len"):
        _plan(cluster_doc, preset="maverick", dtype="fp8", mean_sequence_tokens=9000)
    with pytest.raises(ClusterFileError, match=r"serving.mean_sequence_tokens: .*greater than or equal to 16"):
        _plan(cluster_doc, preset="maverick", dtype="fp8", mean_sequence_tokens=4)
    # Unset, it follows a shorter context.
    assert _plan(cluster_doc, preset="maverick", dtype="fp8", max_context_len=1024).kv.mean_sequence_tokens == 1024

"""LLMEngine with expert parallelism on the two-node test cluster equals the single-process engine."""
from __future__ import annotations

import pytest

from serving.engine import SamplingParams
from serving.engine.executor import LocalExecutor, SeqChunk

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _node_names(placement: list[dict]) -> list[str]:
    import ray

    res = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    return [next(k for k in ("node0", "node1") if k in res[p["node_id"]]) for p in placement]


def _chunks(tokenizer, prompts) -> list[SeqChunk]:
    """Three prefills (then their decodes): sequences land on both nodes."""
    ids = [tokenizer.encode(p) for p in prompts[:3]]
    return [SeqChunk(i, t, 0, True) for i, t in enumerate(ids)]


@pytest.fixture(params=["ep2_engine", "ep4_engine"], ids=["ep2-2nodes", "ep4-2nodes-tp2"])
def ep_engine(request):
    return request.getfixturevalue(request.param)


@pytest.mark.slow
def test_greedy_tokens_match_single_process(ep_engine, reference_tokens, prompts):
    outs = ep_engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference_tokens
    ex = ep_engine.executor
    names = _node_names(ex.placement)
    tp = ex.tp
    assert names == ["node0"] * tp + ["node1"] * tp  # both simulated nodes, node-major ranks


@pytest.mark.slow
def test_fp32_logits_within_1e4_of_single_process(ep_engine, reference_engine, prompts):
    local: LocalExecutor = reference_engine.executor
    ex = ep_engine.executor
    chunks = _chunks(ep_engine.tokenizer, prompts)
    seq0 = 1000  # fresh sequence ids, so neither engine's running sequences are touched
    step1 = [SeqChunk(seq0 + c.seq_id, c.token_ids, 0, True) for c in chunks]
    want, got = local.execute(step1), ex.execute(step1)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    nxt = want.argmax(-1).tolist()
    step2 = [SeqChunk(c.seq_id, [t], len(c.token_ids), True) for c, t in zip(step1, nxt)]
    want, got = local.execute(step2), ex.execute(step2)
    assert (got - want).abs().max().item() < 1e-4
    for c in step1:
        local.free(c.seq_id)
        ex.free(c.seq_id)


@pytest.mark.slow
def test_each_worker_holds_its_share_of_routed_experts(ep_engine, maverick_tiny):
    from llama4.checkpoint import CheckpointReader
    from llama4.config import TextConfig

    cfg = TextConfig.from_pretrained(maverick_tiny)
    ex = ep_engine.executor
    n = len(ex.worker_bytes)
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size * 4  # fp32 gate, up, down
    total = per_expert * cfg.num_local_experts * cfg.num_moe_layers
    for held in ex.worker_bytes:
        assert abs(held["routed_expert_bytes"] - total / n) <= per_expert * cfg.num_moe_layers
    copies = sum(len(ex.expert_placement.copies(layer, e)) for layer in cfg.moe_layers
                 for e in range(cfg.num_local_experts))
    assert sum(h["routed_expert_bytes"] for h in ex.worker_bytes) == per_expert * copies
    # The rest: a whole copy per node, split over the node's workers (tensor parallel: attention, dense MLP,
    # shared expert, and embeddings and lm_head by vocabulary); only norms and routers stay whole on each.
    reader = CheckpointReader(maverick_tiny)
    rest = [(n, reader.get(n).numel() * 4) for n in reader.names() if ".feed_forward.experts." not in n]
    whole = sum(b for n, b in rest if "norm" in n or ".router." in n)
    split = sum(b for n, b in rest) - whole
    assert cfg.vocab_size % ex.tp == 0  # so every split tensor divides evenly and the sum is exact
    for held in ex.worker_bytes:
        assert held["other_bytes"] == whole + split // ex.tp


@pytest.mark.slow
def test_ep4_placement_replicates_experts_across_nodes(ep4_engine):
    """The planner's file was used: experts 0 and 1 have a copy on each node (a token goes to one of them, chosen
    by its index), and the EP=4 tests above pass with it."""
    p = ep4_engine.executor.expert_placement
    assert [c.node for c in p.copies(1, 0)] == [0, 1] and [c.node for c in p.copies(1, 1)] == [0, 1]
    assert [len(p.experts_on(r, 1)) for r in range(4)] == [33, 33, 32, 32]


@pytest.mark.slow
def test_routing_statistics_sum_over_nodes(ep_engine, maverick_tiny):
    from llama4.config import TextConfig

    cfg = TextConfig.from_pretrained(maverick_tiny)
    before = ep_engine.routed_token_counts()
    assert before.shape == (cfg.num_moe_layers, cfg.num_local_experts)
    prompt = ep_engine.tokenizer.encode("count me")
    ep_engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    grown = ep_engine.routed_token_counts() - before
    # Every layer routed each prompt token plus the 2 decoded tokens fed back, top-1.
    assert grown.sum(1).tolist() == [len(prompt) + 2] * cfg.num_moe_layers


@pytest.mark.slow
def test_kv_cache_budget_is_per_worker(ep4_engine, maverick_tiny):
    """ep4_engine was given a per-worker budget of 1.5 full sequences: a worker holds half the KV heads (tp=2),
    so 3 sequences fit per node, 6 in the replica, and each worker allocated exactly that."""
    import torch

    from llama4.config import TextConfig
    from serving.engine.kv_cache import plan_kv_cache

    cfg = TextConfig.from_pretrained(maverick_tiny)
    per_seq = plan_kv_cache(cfg, 256, torch.float32, 1).bytes_per_sequence
    ex = ep4_engine.executor
    assert ex.max_num_seqs == 6 and ep4_engine.scheduler.max_num_seqs == 6
    for held in ex.worker_bytes:
        assert held["kv_slots"] == 3
        assert held["kv_cache_bytes"] == 3 * per_seq / 2 <= 1.5 * per_seq

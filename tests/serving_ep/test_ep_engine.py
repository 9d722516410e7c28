"""LLMEngine with expert parallelism on the two-node test cluster equals the single-process engine."""
from __future__ import annotations

import pytest

from serving.engine import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _node_names(placement: list[dict]) -> list[str]:
    import ray

    res = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    return [next(k for k in ("node0", "node1") if k in res[p["node_id"]]) for p in placement]


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
    ids = [ep_engine.tokenizer.encode(p) for p in prompts[:3]]  # three prefills: they land on both nodes
    want, got = reference_engine.last_token_logits(ids), ep_engine.last_token_logits(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    # Decode steps too: the top-5 log-probabilities of every generated position.
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=5)
    for a, b in zip(reference_engine.generate(ids, params), ep_engine.generate(ids, params)):
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert pa.keys() == pb.keys()
            assert max(abs(pa[t].logprob - pb[t].logprob) for t in pa) < 1e-4


@pytest.mark.slow
def test_a_prefix_hit_lands_on_the_node_that_holds_it(ep_engine, reference_engine, prompts):
    """Blocks and prefix hits work per node: a request sharing a cached prefix goes to the node holding it (not
    the least loaded), reuses its blocks, and still gives the single-process tokens."""
    system = list(range(100, 180))  # 80 tokens: 5 full blocks, the chunk of the hit's end starts at 64
    asks = [system + ep_engine.tokenizer.encode(p) for p in prompts[:2]]
    nodes = []
    for i, ids in enumerate(asks):
        hits = ep_engine.stats().prefix_cache_hits
        ep_engine.add_request(f"prefix-{i}", ids, GREEDY)
        seq = ep_engine._requests[f"prefix-{i}"].seq_id
        ep_engine.step()
        nodes.append(ep_engine.kv.tables(seq)[0])
        if i == 0:  # keep a sequence on this node, so "least loaded" alone would pick the other one
            ep_engine.add_request("hold", [7] * 40, SamplingParams(max_tokens=40, ignore_eos=True))
            ep_engine.step()
        while f"prefix-{i}" in ep_engine._requests:
            ep_engine.step()
        if i == 1:
            assert ep_engine.stats().prefix_cache_hits - hits == 80
    assert nodes[0] == nodes[1]
    ep_engine.abort_request("hold")
    while ep_engine.has_unfinished_requests():
        ep_engine.step()
    want = [o.outputs[0].token_ids for o in reference_engine.generate(asks, GREEDY)]
    got = [o.outputs[0].token_ids for o in ep_engine.generate(asks, GREEDY)]
    assert got == want


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
    so its node's pools hold 3 full sequences' blocks, and each worker allocated exactly that."""
    from llama4.config import TextConfig
    from llama4.sizing import kv_bytes_per_token

    cfg = TextConfig.from_pretrained(maverick_tiny)
    per_seq = kv_bytes_per_token(cfg, "fp32").sequence_bytes(256)
    ex = ep4_engine.executor
    assert (ex.kv_plan.global_blocks, ex.kv_plan.chunked_blocks) == (3 * 16, 3 * 2)
    assert len(ep4_engine.kv.pools) == 2  # one block manager per node
    for held in ex.worker_bytes:
        assert held["kv_blocks"] == [48, 6]
        assert held["kv_cache_bytes"] == 3 * per_seq / 2 <= 1.5 * per_seq


@pytest.mark.slow
def test_n_samples_fork_on_the_node_holding_the_prompt(ep_engine, reference_engine):
    """n > 1 under expert parallelism: the samples share the prompt's blocks on its node, the partial last block
    is copied by that node's workers, and every sample equals the single-process engine's."""
    ids = list(range(200, 245))  # 45 tokens: two full blocks and a partial one
    computed = ep_engine.stats().prompt_tokens_computed
    ep_engine.add_request("n3", ids, SamplingParams(n=3, seed=21, max_tokens=8, ignore_eos=True))
    req = ep_engine._requests["n3"]
    while not req.samples[-1].num_generated:
        ep_engine.step()
    assert len({ep_engine.kv.tables(r.seq_id)[0] for r in req.samples}) == 1
    while ep_engine.has_unfinished_requests():
        out = ep_engine.step()
    assert ep_engine.stats().prompt_tokens_computed - computed == 45
    (want,) = reference_engine.generate([ids], SamplingParams(n=3, seed=21, max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in out[0].outputs] == [o.token_ids for o in want.outputs]
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True)
    (one,) = reference_engine.generate([ids], GREEDY)
    (two,) = ep_engine.generate([ids], greedy)  # a wrong copy would make the second sample differ
    assert [o.token_ids for o in two.outputs] == [one.outputs[0].token_ids[:8]] * 2


@pytest.mark.slow
def test_scored_prompt_rows_come_back_in_order(ep_engine, reference_engine):
    """Echo prompts: every position's logits come back from the node holding the sequence, rows in order, with
    other sequences' single rows in the same step: the scores equal the single-process engine's."""
    ids = [list(range(300, 370)), list(range(400, 441))]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    want = reference_engine.generate(ids + [[5, 6, 7]], [params, params, GREEDY])
    got = ep_engine.generate(ids + [[5, 6, 7]], [params, params, GREEDY])
    for a, b in zip(want, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for a, b in zip(want[:2], got[:2]):
        assert len(b.prompt_logprobs) == len(a.prompt_logprobs) and b.prompt_logprobs[0] is None
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert pa.keys() == pb.keys() and max(abs(pa[t].logprob - pb[t].logprob) for t in pa) < 1e-4

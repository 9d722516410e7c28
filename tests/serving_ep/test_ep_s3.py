"""S3 byte-range loading: a worker fetches only the headers and the rows it asks for, once per node."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from llama4.checkpoint import INDEX_FILE, CheckpointReader
from serving.expert_parallel.s3 import S3Checkpoint, upload_checkpoint

EXPERTS = "model.layers.1.feed_forward.experts.gate_up_proj"


@pytest.fixture
def s3_ckpt(maverick_tiny, s3_bucket):
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/maverick-tiny"
    upload_checkpoint(maverick_tiny, url, endpoint_url=endpoint)
    return url, endpoint


def _header_bytes(folder, fname: str) -> int:
    with open(folder / fname, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_rows_match_local_reader_and_only_their_bytes_are_fetched(s3_ckpt, maverick_tiny, tmp_path):
    url, endpoint = s3_ckpt
    local = CheckpointReader(maverick_tiny)
    ckpt = S3Checkpoint(url, cache_dir=tmp_path / "node0", endpoint_url=endpoint)
    index_bytes = (maverick_tiny / INDEX_FILE).stat().st_size
    assert ckpt.bytes_fetched == index_bytes

    rows = [0, 1, 2, 40, 41, 127]
    got = ckpt.get_rows(EXPERTS, rows)
    assert torch.equal(got, local.get_rows(EXPERTS, rows))
    full = local.get(EXPERTS)
    row_bytes = full[0].numel() * full.element_size()
    fname = json.loads((maverick_tiny / INDEX_FILE).read_text())["weight_map"]["language_model." + EXPERTS]
    assert ckpt.bytes_fetched == index_bytes + _header_bytes(maverick_tiny, fname) + len(rows) * row_bytes

    before = ckpt.bytes_fetched
    norm = "model.norm.weight"
    assert torch.equal(ckpt.get(norm), local.get(norm))
    assert ckpt.bytes_fetched > before


def test_node_local_cache_serves_a_second_reader_without_fetching(s3_ckpt, tmp_path):
    url, endpoint = s3_ckpt
    first = S3Checkpoint(url, cache_dir=tmp_path / "node0", endpoint_url=endpoint)
    a = first.get_rows(EXPERTS, range(64))
    second = S3Checkpoint(url, cache_dir=tmp_path / "node0", endpoint_url=endpoint)
    after_index = second.bytes_fetched
    assert torch.equal(second.get_rows(EXPERTS, range(64)), a)
    assert second.bytes_fetched == after_index  # header and rows both came from the node's disk
    other_node = S3Checkpoint(url, cache_dir=tmp_path / "node1", endpoint_url=endpoint)
    other_node.get_rows(EXPERTS, range(64))
    assert other_node.bytes_fetched > after_index


def test_metadata_download_and_bad_urls(s3_ckpt, tmp_path):
    url, endpoint = s3_ckpt
    dest = S3Checkpoint(url, cache_dir=tmp_path / "c", endpoint_url=endpoint).download_metadata(tmp_path / "meta")
    assert (dest / "config.json").exists() and (dest / "tokenizer.json").exists()
    assert not list(dest.glob("*.safetensors"))
    with pytest.raises(ValueError, match="not an s3:// URL"):
        S3Checkpoint("/local/path", cache_dir=tmp_path)
    with pytest.raises(Exception, match="cannot read"):
        S3Checkpoint(url + "-missing", cache_dir=tmp_path / "d", endpoint_url=endpoint)


@pytest.mark.slow
def test_ep2_engine_from_s3_fetches_only_each_workers_share(ep2_engine, maverick_tiny):
    """Two nodes, no shared folder for weights: each worker fetched the non-expert tensors (its node's copy) and
    exactly its own experts' rows. (Its answers equal the single-process engine's: test_ep_engine.)"""
    from llama4.config import TextConfig

    cfg = TextConfig.from_pretrained(maverick_tiny)
    local = CheckpointReader(maverick_tiny)
    text = list(local.names())
    files = {local.weight_map[local.full_name(n)] for n in text}
    index_bytes = (maverick_tiny / INDEX_FILE).stat().st_size
    common = index_bytes + sum(_header_bytes(maverick_tiny, f) for f in files)
    expert_row_bytes = 0  # one expert of every MoE layer, as stored (bf16)
    for n in text:
        t = local.get(n)
        nbytes = t.numel() * t.element_size()
        if ".feed_forward.experts." in n:
            expert_row_bytes += nbytes // t.shape[0]
        else:
            common += nbytes
    per_layer = expert_row_bytes // cfg.num_moe_layers
    first = ep2_engine.executor.load_history[0]
    assert [h["experts_per_layer"] for h in first] == [[64] * cfg.num_moe_layers] * 2
    for h in first:
        own = per_layer * sum(h["experts_per_layer"])
        assert h["bytes_fetched"] == common + own
        assert abs(own - expert_row_bytes * cfg.num_local_experts / 2) <= expert_row_bytes  # one expert per layer
    for later in ep2_engine.executor.load_history[1:]:  # rebuilds read the node-local cache
        assert [h["bytes_fetched"] for h in later] == [index_bytes] * 2


def test_tensor_parallel_shard_loads_only_its_rows_from_s3(s3_ckpt, maverick_tiny, tmp_path):
    """A TP worker's model is built sharded on the meta device and filled with just its rows (byte ranges)."""
    from cluster.placement import PlacementMap
    from llama4.config import TextConfig
    from serving.expert_parallel.tensor_parallel import apply_tensor_parallel
    from serving.loader import load_shard

    url, endpoint = s3_ckpt
    cfg = TextConfig.from_pretrained(maverick_tiny)
    placement = PlacementMap.contiguous(list(cfg.moe_layers), cfg.num_local_experts, 2, nodes=1)
    local = CheckpointReader(maverick_tiny)
    fetched = {}
    for tp, rank in ((1, 0), (2, 1)):
        reader = S3Checkpoint(url, cache_dir=tmp_path / f"tp{tp}", endpoint_url=endpoint)
        model = load_shard(cfg, reader, expert_ids=lambda layer: placement.experts_on(rank, layer),
                           shard=lambda m: apply_tensor_parallel(m, rank, tp, group=None),  # hooks run in forward
                           optimize=False)
        fetched[tp] = reader.bytes_fetched
        attn = model.layers[0].self_attn
        q = local.get("model.layers.0.self_attn.q_proj.weight").float()
        o = local.get("model.layers.0.self_attn.o_proj.weight").float()
        n = q.shape[0] // tp
        assert torch.equal(attn.q_proj.weight, q[rank * n:(rank + 1) * n])
        assert torch.equal(attn.o_proj.weight, o[:, rank * n:(rank + 1) * n])
        experts = model.layers[1].feed_forward.experts
        assert experts.expert_ids == list(range(64 * rank, 64 * rank + 64))
        assert torch.equal(experts.down_proj, local.get_rows("model.layers.1.feed_forward.experts.down_proj",
                                                             experts.expert_ids).float())
    assert fetched[2] < fetched[1]  # rows of q/k/v/gate/up: half the bytes of the whole tensors


def test_one_worker_downloads_the_whole_checkpoint_once_and_serves_it(s3_ckpt, maverick_tiny, tmp_path):
    """EP=1 from s3://: the replica copies the checkpoint to its node, byte-identical, and answers as from disk."""
    from serving.api.config import parse_args
    from serving.engine import LLMEngine, SamplingParams

    url, endpoint = s3_ckpt
    assert parse_args({"model": url, "s3_endpoint_url": endpoint}).expert_parallel_size == 1
    remote = S3Checkpoint(url, cache_dir=tmp_path / "c", endpoint_url=endpoint)
    local = remote.download_all(tmp_path / "ckpt")
    for f in maverick_tiny.iterdir():
        assert (local / f.name).read_bytes() == f.read_bytes(), f.name
    fetched = remote.bytes_fetched
    remote.download_all(tmp_path / "ckpt")  # a second call (a restarted replica) fetches no weights again
    metadata = sum(f.stat().st_size for f in local.iterdir() if f.suffix != ".safetensors")
    assert remote.bytes_fetched - fetched == metadata
    params = SamplingParams(max_tokens=8, temperature=0.0)
    got = LLMEngine.from_pretrained(local).generate(["The capital of France is"], params)[0].outputs[0].token_ids
    want = LLMEngine.from_pretrained(maverick_tiny).generate(["The capital of France is"], params)[0].outputs[0].token_ids
    assert got == want

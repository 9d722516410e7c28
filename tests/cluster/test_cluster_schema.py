"""The cluster file's errors: each a single line naming the YAML path, the bad value and the fix."""
from __future__ import annotations

import json

import pytest

from cluster.schema import ClusterFileError, load_cluster, parse_cluster
from llama4.presets import get_preset


def _error(doc, source="c.yaml") -> str:
    with pytest.raises(ClusterFileError) as e:
        parse_cluster(doc, source)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    return msg


def test_valid_file_loads_with_defaults(cluster_doc, write_cluster):
    spec = load_cluster(write_cluster(cluster_doc()))
    assert spec.serving.replicas == 1 and spec.serving.gpu_memory_fraction == 0.9
    assert spec.expert_parallel_size == 8
    assert spec.text_config.num_local_experts == 128
    assert spec.served_model_name == "llama4-maverick"


def test_wrong_type_names_path_value_and_fix(cluster_doc):
    doc = cluster_doc()
    doc["node_groups"][0]["gpus_per_node"] = "eight"
    assert _error(doc) == ("c.yaml: node_groups[0].gpus_per_node: 'eight' is not accepted: Input should be a valid "
                           "integer, unable to parse string as an integer; set it to GPUs per node (for gpu: cpu, "
                           "worker processes per node)")


def test_out_of_bounds_value(cluster_doc):
    doc = cluster_doc(gpu_memory_fraction=1.5)
    msg = _error(doc)
    assert msg.startswith("c.yaml: serving.gpu_memory_fraction: 1.5 is not accepted: Input should be less than or "
                          "equal to 1")
    assert "share of each GPU's memory herd may use" in msg


@pytest.mark.parametrize("where,key,suggestion", [
    ((), "servng", "serving"),
    (("node_groups", 0), "gpus_per_nod", "gpus_per_node"),
    (("serving",), "max_context_length", "max_context_len"),
    (("model",), "weights_dtype", "weight_dtype"),
])
def test_unknown_key_did_you_mean(cluster_doc, where, key, suggestion):
    doc = cluster_doc()
    target = doc
    for part in where:
        target = target[part]
    target[key] = 1
    msg = _error(doc)
    path = ".".join(str(p) for p in where).replace(".0", "[0]")
    assert msg.startswith(f"c.yaml: {path + '.' if path else ''}{key}: unknown key (did you mean '{suggestion}'?)")
    assert f"valid keys in {path or 'the top level'}: " in msg


def test_unknown_gpu_and_preset_suggest_names(cluster_doc):
    doc = cluster_doc()
    doc["node_groups"][0]["gpu"] = "H100"
    assert "node_groups[0].gpu: 'H100' is not accepted: unknown GPU kind (did you mean 'H100-80GB'?)" in _error(doc)
    doc = cluster_doc(preset="maverik")
    assert _error(doc) == ("c.yaml: model.preset: unknown preset 'maverik' (did you mean 'maverick'?); choose one "
                           "of: scout, maverick, scout-tiny, maverick-tiny, maverick-bench")


def test_expert_parallel_size_must_match_replica_gpus(cluster_doc):
    doc = cluster_doc(expert_parallel_size=16)
    assert _error(doc) == ("c.yaml: serving.expert_parallel_size: 16 does not match the replica's GPUs "
                           "(serving.nodes_per_replica 1 x node_groups[0].gpus_per_node 8 = 8); set it to 8 or "
                           "remove it")


def test_expert_parallel_size_must_divide_experts(cluster_doc):
    """The engine's own layout rule (serving.config.check_layout), in this file's field names."""
    doc = cluster_doc(count=3, nodes_per_replica=3)
    assert _error(doc) == ("c.yaml: serving.nodes_per_replica: serving.nodes_per_replica x node_groups[0].gpus_per_node "
                           "(3 x 8 = 24) does not divide the model's 128 experts: every worker holds the same number "
                           "of expert slots; set serving.redundant_experts to 16; or use 1 or 2 or 4 nodes per replica")
    doc = cluster_doc(preset="scout", gpus=2, count=3, nodes_per_replica=3, expert_parallel_size=6)
    assert "serving.expert_parallel_size: serving.nodes_per_replica x node_groups[0].gpus_per_node (3 x 2 = 6)" \
        in _error(doc)
    assert "16 experts: " in _error(doc)
    # redundant copies make it divide: 128 + 16 = 144 = 6 x 24
    parse_cluster(cluster_doc(count=3, nodes_per_replica=3, redundant_experts=16), "c.yaml")


def test_gpus_per_node_must_split_the_models_heads(cluster_doc):
    """Six GPUs per node cannot split Scout's 8 key/value heads: the engine would refuse it, so the file is."""
    doc = cluster_doc(preset="scout", gpus=6, expert_parallel_size=6)
    assert _error(doc) == ("c.yaml: node_groups[0].gpus_per_node: node_groups[0].gpus_per_node (6) must divide the "
                           "model's num_key_value_heads (8): a node's workers split it evenly; choose a divisor of 8 "
                           "(1, 2, 4, 8)")


def test_missing_and_cross_field_errors(cluster_doc):
    doc = cluster_doc()
    del doc["model"]
    assert _error(doc) == "c.yaml: model: missing; add it (the model and its dtypes)"
    doc = cluster_doc(node_group="gpus")
    assert _error(doc) == ("c.yaml: serving.node_group: no node group 'gpus' (did you mean 'gpu'?); choose one of: "
                           "gpu")
    doc = cluster_doc(max_context_len=2_000_000)
    assert "serving.max_context_len: 2000000 exceeds the model's max_position_embeddings 1048576; lower it" in \
        _error(doc)
    doc = cluster_doc()
    doc["model"] = {"checkpoint": "s3://bucket/m"}
    assert "model.preset: needed when model.checkpoint is an s3:// URI" in _error(doc)


def test_yaml_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnode_groups: [\n")
    with pytest.raises(ClusterFileError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_cluster(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ClusterFileError, match="must be a YAML mapping"):
        load_cluster(bad)
    with pytest.raises(ClusterFileError, match="no such file"):
        load_cluster(tmp_path / "missing.yaml")


def _checkpoint_dir(tmp_path, preset):
    """A folder with a released-layout config.json (all the planner reads of a checkpoint)."""
    p = get_preset(preset)
    (tmp_path / preset).mkdir()
    (tmp_path / preset / "config.json").write_text(json.dumps({
        "architectures": ["Llama4ForConditionalGeneration"],
        "text_config": {**p.text, "vocab_size": p.bpe_vocab_size + 2048}}))
    return str(tmp_path / preset)


def test_shape_from_checkpoint_config_and_mismatch(cluster_doc, tmp_path):
    ckpt = _checkpoint_dir(tmp_path, "maverick-tiny")
    doc = cluster_doc(gpus=2)  # maverick-tiny has 2 key/value heads: at most 2 workers per node
    doc["model"] = {"checkpoint": ckpt}
    spec = parse_cluster(doc)
    assert spec.text_config.num_local_experts == 128
    assert spec.serving.max_context_len == 4096  # unset: the model's own limit, below the 8192 default
    doc["model"] = {"checkpoint": ckpt, "preset": "scout-tiny"}
    msg = _error(doc)
    assert "model.preset: 'scout-tiny' has num_local_experts 16 but model.checkpoint" in msg
    doc["model"] = {"checkpoint": str(tmp_path / "nowhere")}
    assert "has no config.json" in _error(doc)


def test_misspelt_required_key_reports_the_misspelling_not_the_missing_key(cluster_doc):
    doc = cluster_doc()
    doc["node_groups"][0]["gpus_per_nod"] = doc["node_groups"][0].pop("gpus_per_node")
    msg = _error(doc)
    assert msg.startswith("c.yaml: node_groups[0].gpus_per_nod: unknown key (did you mean 'gpus_per_node'?)")
    assert msg.endswith("(1 more problem after this one)")


def test_errors_from_a_file_carry_the_line(cluster_doc, write_cluster):
    doc = cluster_doc(expert_parallel_size=16)
    path = write_cluster(doc)
    text = path.read_text().splitlines()
    with pytest.raises(ClusterFileError) as e:
        load_cluster(path)
    line = text.index("  expert_parallel_size: 16") + 1
    assert str(e.value).startswith(f"{path}:{line}: serving.expert_parallel_size: 16 does not match")
    doc = cluster_doc()
    del doc["node_groups"][0]["cpus"]
    path = write_cluster(doc, "b.yaml")
    with pytest.raises(ClusterFileError) as e:
        load_cluster(path)
    line = path.read_text().splitlines().index("- name: gpu") + 1  # a missing key: its section's line
    assert str(e.value) == f"{path}:{line}: node_groups[0].cpus: missing; add it (CPUs Ray may use on each node)"


@pytest.mark.parametrize("section,key,value,message", [
    ("model", "checkpoint", "gs://b/m", "model.checkpoint: 'gs://b/m' is not accepted: gs:// is not supported; use a "
                                        "local path or s3://bucket/prefix"),
    ("storage", "uri", "s3:///x", "storage.uri: 's3:///x' is not accepted: s3:// URI has no bucket"),
    ("storage", "endpoint_url", "localhost:9000", "storage.endpoint_url: 'localhost:9000' is not accepted"),
    ("licensing", "store", "http://x/y", "licensing.store: 'http://x/y' is not accepted: http:// is not supported"),
])
def test_locations_and_lists(cluster_doc, section, key, value, message):
    doc = cluster_doc()
    doc.setdefault(section, {})[key] = value
    assert _error(doc).startswith(f"c.yaml: {message}")


def test_a_list_item_of_the_wrong_type(cluster_doc):
    doc = cluster_doc()
    doc["node_groups"] = ["gpu"]
    assert _error(doc) == ("c.yaml: node_groups[0]: 'gpu' is not accepted: Input should be a valid dictionary or "
                           "instance of NodeGroup; set it to groups of identical worker nodes")

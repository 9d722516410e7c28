"""Fixtures for the cluster tests: a builder of minimal valid cluster documents, and a writer to YAML files."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

def _cluster_doc(preset: str = "maverick", dtype: str = "bf16", gpu: str = "H100-80GB", gpus: int = 8,
                count: int = 1, nodes_per_replica: int = 1, **serving) -> dict:
    """A cluster document with one node group; `serving` keys override the defaults."""
    return {
        "name": "test",
        "provider": {"cloud": "aws", "region": "us-east-1"},
        "head": {"price_per_hour": 0.5},
        "node_groups": [{"name": "gpu", "gpu": gpu, "gpus_per_node": gpus, "count": count, "cpus": 180,
                         "ram_gib": 1800, "instance_type": "p5.48xlarge", "price_per_hour": 98.0}],
        "model": {"preset": preset, "checkpoint": f"s3://bucket/{preset}", "weight_dtype": dtype},
        "serving": {"nodes_per_replica": nodes_per_replica, **serving},
    }


@pytest.fixture
def cluster_doc():
    """The cluster-document builder (a fixture, since test modules cannot import a conftest by name)."""
    return _cluster_doc


@pytest.fixture
def write_cluster(tmp_path):
    """Write a cluster document to a YAML file; returns its path."""

    def write(doc: dict, name: str = "cluster.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(copy.deepcopy(doc), sort_keys=False))
        return path

    return write

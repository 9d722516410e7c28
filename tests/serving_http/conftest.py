"""Fixtures for the HTTP tests: Serve on a free loopback port, keys file, a reference engine.

Serve is started once per session (its proxy binds 127.0.0.1, head node only: both simulated nodes share the
address); each module deploys its own app with `deploy_app(...)` (serving_http_helpers.py) and deletes it when
done, so a module pays the ~10 s app startup once.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from serving_http_helpers import API_IDENTITY, API_KEY, MAX_MODEL_LEN, free_port


@pytest.fixture(scope="session")
def serve_port(ray_cluster):
    """Serve's HTTP proxy on 127.0.0.1:<free port>; shut down at the end of the session."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys.yaml"
    path.write_text(f"keys:\n  {API_KEY}: {API_IDENTITY}\n  sk-test-alice-abcdef0123456789: alice\n")
    return path


@pytest.fixture(scope="session")
def reference_engine(scout_tiny):
    """The engine in-process with the servers' settings: what every HTTP answer must equal."""
    from serving.engine import LLMEngine

    eng = LLMEngine.from_pretrained(str(scout_tiny), dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=4)
    yield eng
    eng.shutdown()



"""Hostile requests against a real Serve app: the server answers each one in OpenAI's error shape (or serves it),
never a 500, and keeps serving; /health reports the model replica's engine state."""
from __future__ import annotations

import httpx
import pytest

from reliability.helpers import AUTH, deploy, keys_file

pytestmark = pytest.mark.slow
APP = "reliability-hostile"


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, tmp_path_factory):
    from ray import serve

    base = deploy(APP, serve_port, model=str(scout_tiny), max_num_seqs=2, max_waiting_requests=4,
                  api_keys_file=keys_file(tmp_path_factory.mktemp("keys")))
    yield base
    serve.delete(APP, _blocking=True)


def _comp(**fields):
    return {"model": "scout-tiny", "prompt": "The herd", "max_tokens": 5, **fields}


def test_a_tiny_temperature_is_served_greedily_and_the_replica_stays_up(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        greedy = c.post("/v1/completions", json=_comp(temperature=0))
        assert greedy.status_code == 200, greedy.text
        for _ in range(3):  # repeated: a request that killed the loop would make the next ones 500
            r = c.post("/v1/completions", json=_comp(temperature=1e-40))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["healthy"] == 1

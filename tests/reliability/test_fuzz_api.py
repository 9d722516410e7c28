"""Fuzzing the HTTP API with Schemathesis against the server's own `/openapi.json`, with valid and invalid requests:
every answer is a documented status in OpenAI's error shape (4xx) or a success, never a 500, and the server keeps
serving afterwards.

Examples are capped per operation (`max_examples`) and each generation asks for at most a few tokens, so the whole
run stays within a minute or two on a CPU machine; `HERD_FUZZ_EXAMPLES` raises the cap for a longer hunt.
"""
from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from reliability.helpers import AUTH, deploy, keys_file

pytestmark = pytest.mark.slow
APP = "reliability-fuzz"
EXAMPLES = int(os.environ.get("HERD_FUZZ_EXAMPLES", "10"))
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, tmp_path_factory):
    from ray import serve

    base = deploy(APP, serve_port, model=str(scout_tiny), max_num_seqs=2, max_waiting_requests=8,
                  api_keys_file=keys_file(tmp_path_factory.mktemp("keys")))
    yield base
    serve.delete(APP, _blocking=True)


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


def _cap(case) -> None:
    """Keep each generation short: the point is the input's shape, not its length."""
    body = case.body if isinstance(case.body, dict) else None
    if body is None:
        return
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if "max_completion_tokens" not in body and ("messages" in body or "prompt" in body):
        body.setdefault("max_tokens", MAX_TOKENS)
    if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 4:
        body["prompt"] = body["prompt"][:4]


def _check(case, server) -> None:
    _cap(case)
    response = case.call(base_url=server, headers=AUTH, timeout=120)
    status = response.status_code
    assert status < 500 or (status == 503 and "retry-after" in {k.lower() for k in response.headers}), \
        f"{case.method} {case.path} -> {status}: {response.text[:500]}"
    if status >= 400 and case.path != "/metrics":
        err = response.json()["error"]
        assert isinstance(err["message"], str) and isinstance(err["type"], str) and "code" in err and "param" in err


def test_every_answer_is_documented_never_a_500(api_schema, server):
    # Driven through Hypothesis directly (Schemathesis' pytest plugin does not run under pytest 9).
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for op, mode in [(op, mode) for op in operations for mode in schemathesis.GenerationMode]:
        @given(case=op.as_strategy(mode))  # valid requests, then invalid ones (wrong types, missing fields...)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        def fuzz(case):
            _check(case, server)

        try:
            fuzz()
        except Unsatisfiable:  # an operation with no inputs (GET /health) has no invalid requests to make
            assert mode is schemathesis.GenerationMode.NEGATIVE, op.path


def test_the_server_still_serves_after_the_fuzzing(server):
    r = httpx.post(f"{server}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "scout-tiny", "prompt": "The herd", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"

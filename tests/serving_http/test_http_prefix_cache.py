"""Prefix caching over HTTP: a repeated prompt is served from cached blocks, and tenants do not share them when
the operator asks (`prefix_cache_per_api_key`) or a client salts its requests (`cache_salt`)."""
from __future__ import annotations

import time

import httpx
import pytest

from serving_http_helpers import API_KEY, delete_app, deploy_app, metric_value

APP = "herd-prefix"
ALICE = "sk-test-alice-abcdef0123456789"
PROMPT = "The herd crossed the river at dawn, " * 6  # ~50 tokens: three full 16-token blocks


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, keys_file):
    base = deploy_app(APP, serve_port, model=str(scout_tiny), api_keys_file=str(keys_file), max_num_seqs=4,
                      prefix_cache_per_api_key=True)
    yield base
    delete_app(APP)


def _hits(base: str, at_least: float = 0.0) -> tuple[float, float]:
    """(prefix-cache queries, hits) from /metrics once the replica's push has caught up with `at_least` queries."""
    deadline = time.time() + 20
    while True:
        text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
        try:
            q, h = metric_value(text, "herd:prefix_cache_queries_total"), metric_value(text, "herd:prefix_cache_hits_total")
        except KeyError:
            q, h = 0.0, 0.0
        if q >= at_least or time.time() > deadline:
            return q, h
        time.sleep(0.3)


def _complete(base: str, key: str, **extra) -> dict:
    body = {"model": "scout-tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra}
    r = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_tenants_share_cached_prompt_blocks_only_with_themselves(server):
    first = _complete(server, API_KEY)
    n = first["usage"]["prompt_tokens"]
    q0, h0 = _hits(server, at_least=n)
    again = _complete(server, API_KEY)  # same key, same prompt: the full blocks come from the cache
    q1, h1 = _hits(server, at_least=q0 + n)
    assert h1 - h0 == (n - 1) // 16 * 16 > 0
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    other = _complete(server, ALICE)  # another key: salted apart, computed in full, same answer
    q2, h2 = _hits(server, at_least=q1 + n)
    assert h2 == h1 and other["choices"][0]["text"] == first["choices"][0]["text"]
    salted = _complete(server, API_KEY, cache_salt="run-2")  # the client's own salt: no hit either
    _, h3 = _hits(server, at_least=q2 + n)
    assert h3 == h2 and salted["choices"][0]["text"] == first["choices"][0]["text"]
    bad = httpx.post(f"{server}/v1/completions", json={"model": "scout-tiny", "prompt": "x", "cache_salt": ""},
                     headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"


@pytest.mark.slow
def test_n_choices_admit_the_prompt_once(server):
    """n=4 is one admission (the other three samples fork from its blocks), where four requests are four: the
    prefix-cache query counter rises by the prompt length once for the n request."""
    prompt = "Four answers from one prompt about llamas and alpacas, " * 3
    q0, _ = _hits(server)
    many = _complete(server, ALICE, prompt=prompt, n=4, seed=9, temperature=1.0)
    pt = many["usage"]["prompt_tokens"]
    singles = [_complete(server, ALICE, prompt=prompt, seed=9 + j, temperature=1.0) for j in range(4)]
    q1, _ = _hits(server, at_least=q0 + 5 * pt)
    time.sleep(1.5)  # one more push: nothing else is still counting
    q1, _ = _hits(server, at_least=q1)
    assert q1 - q0 == pt + 4 * pt  # 1 admission for n=4, 4 for the singles
    assert [c["text"] for c in many["choices"]] == [s["choices"][0]["text"] for s in singles]

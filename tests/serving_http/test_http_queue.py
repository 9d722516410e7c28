"""A full queue answers 503 with Retry-After in OpenAI's error shape, promptly, and the server recovers."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from serving_http_helpers import delete_app, deploy_app

pytestmark = pytest.mark.slow
APP = "http-queue"


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny):
    # One running sequence, one waiting: a handful of concurrent long requests overflows it.
    base = deploy_app(APP, serve_port, model=str(scout_tiny), max_num_seqs=1, max_waiting_requests=1,
                      retry_after_s=2)
    yield base
    delete_app(APP)


async def _one(client: httpx.AsyncClient, i: int):
    body = {"model": "scout-tiny", "prompt": f"Story {i}:", "max_tokens": 60, "ignore_eos": True,
            "temperature": 1.0, "seed": i, "stream": True}
    t0 = time.time()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, dict(r.headers), r.json(), time.time() - t0
        lines = [line async for line in r.aiter_lines() if line]
        return r.status_code, dict(r.headers), lines, time.time() - t0


def test_full_queue_gets_503_with_retry_after(server):
    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            return await asyncio.gather(*[_one(c, i) for i in range(10)])

    results = asyncio.run(run())
    codes = sorted(code for code, *_ in results)
    refused = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    assert refused, f"no 503 among {codes}"
    assert len(served) >= 2, codes
    assert set(codes) <= {200, 503}, codes
    for _, headers, body, seconds in refused:
        assert headers["retry-after"] == "2"
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "service_unavailable_error"
        assert seconds < 10  # refused at once, not after waiting for a slot
    for _, _, lines, _ in served:
        assert lines[-1] == "data: [DONE]"

    # Once the burst is over the server serves again.
    r = httpx.post(f"{server}/v1/completions", timeout=60,
                   json={"model": "scout-tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text

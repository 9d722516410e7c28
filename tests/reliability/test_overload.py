"""Overload: three times what a replica can hold, streaming, for 30 s. Every accepted request finishes, every
refused one gets 503 with Retry-After, nothing gets a 500, and the replica's resident memory grows by less than 20%."""
from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest

from reliability.helpers import AUTH, deploy, keys_file

pytestmark = pytest.mark.slow
APP = "reliability-overload"
SEQS, WAITING = 2, 2  # the replica runs 2 and queues 2: capacity 4
CLIENTS = 3 * (SEQS + WAITING)
SECONDS = 30


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, tmp_path_factory):
    from ray import serve

    base = deploy(APP, serve_port, model=str(scout_tiny), max_num_seqs=SEQS, max_waiting_requests=WAITING,
                  retry_after_s=1, api_keys_file=keys_file(tmp_path_factory.mktemp("keys")))
    yield base
    serve.delete(APP, _blocking=True)


def _replica_process(server) -> psutil.Process:
    replicas = httpx.get(f"{server}/health", timeout=10).json()["replicas"]
    return psutil.Process(int(replicas[0]["replica"].split("-")[0]))  # replica ids start with the pid


async def _client(c: httpx.AsyncClient, i: int, until: float, results: list) -> None:
    n = 0
    while time.time() < until:
        body = {"model": "scout-tiny", "prompt": f"Client {i} story {n}:", "max_tokens": 12, "stream": True,
                "temperature": 0.8, "seed": n}
        n += 1
        async with c.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
            if r.status_code != 200:
                await r.aread()
                results.append((r.status_code, r.headers.get("retry-after"), r.text[:200]))
                await asyncio.sleep(0.2)
                continue
            lines = [line async for line in r.aiter_lines() if line]
            results.append((200, lines[-1], "".join(lines)[-200:]))


def test_three_times_capacity_for_30_seconds(server):
    replica = _replica_process(server)
    rss_before = replica.memory_info().rss

    async def run():
        results: list = []
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            until = time.time() + SECONDS
            await asyncio.gather(*[_client(c, i, until, results) for i in range(CLIENTS)])
        return results

    results = asyncio.run(run())
    codes = sorted({code for code, *_ in results})
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert set(codes) <= {200, 503}, [r for r in results if r[0] not in (200, 503)][:3]
    assert served and refused, f"{len(served)} served, {len(refused)} refused: not overloaded?"
    assert all(last == "data: [DONE]" for _, last, _ in served), "an accepted stream did not finish"
    assert all(retry == "1" for _, retry, _ in refused)
    rss_after = replica.memory_info().rss
    assert rss_after < 1.2 * rss_before, f"replica RSS grew {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    ok = httpx.post(f"{server}/v1/completions", headers=AUTH, timeout=60,
                    json={"model": "scout-tiny", "prompt": "After", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text
    print(f"overload: {len(served)} served, {len(refused)} refused with 503 in {SECONDS}s; replica RSS "
          f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")

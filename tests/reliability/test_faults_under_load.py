"""Faults under streaming load: an expert-parallel worker, then a whole model replica, are killed (SIGKILL) while
clients stream. Only requests in flight on the killed part fail; every other request succeeds; the service is back
within the stated bounds (EP group rebuilt: RECOVER_EP_S; replica replaced by Serve: RECOVER_REPLICA_S), and both
replicas are healthy again at the end.

The app: 2 model replicas, each expert-parallel over 2 Ray workers (one per simulated node). Killed processes are
found among the children of this session's own raylets, never elsewhere on the machine.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest

from reliability.helpers import AUTH, deploy, keys_file

pytestmark = pytest.mark.slow
APP = "reliability-faults"
CLIENTS = 4
RECOVER_EP_S = 120.0  # a new worker group: new actors, new process groups, weights reloaded
RECOVER_REPLICA_S = 60.0  # the other replica keeps serving; Serve replaces the dead one meanwhile
GRACE_S = 3.0  # a request sent just before a kill may still be routed to the killed part


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, tmp_path_factory):
    from ray import serve

    base = deploy(APP, serve_port, model=str(scout_tiny), num_replicas=2, max_num_seqs=4, expert_parallel_size=2,
                  nodes=["node0", "node1"], worker_num_cpus=0.25, api_keys_file=keys_file(tmp_path_factory.mktemp("k")))
    deadline = time.time() + 120
    while httpx.get(f"{base}/health", timeout=10).json().get("healthy", 0) < 2:
        assert time.time() < deadline, "both replicas did not come up"
        time.sleep(1)
    yield base
    serve.delete(APP, _blocking=True)


def _ours(ray_cluster, title: str) -> list[psutil.Process]:
    """Processes named `title` (Ray's process title: ray::Class or ray::Class.method) under this session's raylets."""
    out = []
    for node in ray_cluster.list_all_nodes():
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        for p in raylet.children(recursive=True):
            try:
                if p.cmdline() and p.cmdline()[0].startswith(title):
                    out.append(p)
            except psutil.Error:
                pass
    return out


async def _stream(c: httpx.AsyncClient, n: int) -> tuple[float, float, bool, str]:
    t0 = time.time()
    body = {"model": "scout-tiny", "prompt": f"Story {n}:", "max_tokens": 16, "stream": True, "temperature": 0.7,
            "seed": n}
    try:
        async with c.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
            if r.status_code != 200:
                return t0, time.time(), False, f"status {r.status_code}: {(await r.aread())[:200]!r}"
            lines = [line async for line in r.aiter_lines() if line]
        ok = lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
        return t0, time.time(), ok, lines[-1][:200]
    except httpx.HTTPError as e:  # the connection to a killed replica's stream may break
        return t0, time.time(), False, f"{e.__class__.__name__}: {e}"


def test_killing_a_worker_then_a_replica_fails_only_what_was_in_flight(server, ray_cluster):
    results: list = []
    kills: list[float] = []

    async def clients(until: list) -> None:
        async with httpx.AsyncClient(base_url=server, timeout=180) as c:
            async def one(i: int) -> None:
                n = i
                while time.time() < until[0]:
                    results.append(await _stream(c, n))
                    n += CLIENTS

            await asyncio.gather(*[one(i) for i in range(CLIENTS)])

    def recovered_since(t: float) -> float | None:
        done = [end for start, end, ok, _ in results if ok and start > t]
        return min(done) - t if done else None

    async def chaos(until: list) -> None:
        await asyncio.sleep(8)
        workers = _ours(ray_cluster, "ray::EPWorker")
        assert len(workers) == 4, [p.cmdline()[0] for p in workers]
        kills.append(time.time())
        os.kill(workers[0].pid, signal.SIGKILL)  # one expert-parallel worker of one replica
        while recovered_since(kills[-1] + RECOVER_EP_S / 4) is None and time.time() < kills[-1] + RECOVER_EP_S:
            await asyncio.sleep(1)
        await asyncio.sleep(3)
        replicas = _ours(ray_cluster, "ray::ServeReplica:" + APP + ":ModelServer")
        assert len(replicas) == 2, [p.cmdline()[0] for p in replicas]
        kills.append(time.time())
        os.kill(replicas[0].pid, signal.SIGKILL)  # a whole model replica
        await asyncio.sleep(15)
        until[0] = time.time()

    async def main():
        until = [time.time() + 400]
        await asyncio.gather(clients(until), chaos(until))

    asyncio.run(main())
    failed = [r for r in results if not r[2]]
    for start, end, _, why in failed:  # each failure was in flight at a kill
        assert any(start <= k + GRACE_S and end >= k for k in kills), f"failed outside a kill: {why}"
    ep_kill, replica_kill = kills
    assert recovered_since(ep_kill) is not None and recovered_since(ep_kill) < RECOVER_EP_S
    assert recovered_since(replica_kill) is not None and recovered_since(replica_kill) < RECOVER_REPLICA_S
    late = [r for r in results if r[0] > replica_kill + GRACE_S]
    assert late and all(ok for _, _, ok, _ in late), [why for *_, ok, why in late if not ok][:3]
    deadline = time.time() + 180
    while httpx.get(f"{server}/health", timeout=10).json().get("healthy", 0) < 2:
        assert time.time() < deadline, "the killed replica was not replaced"
        time.sleep(2)
    print(f"faults under load: {len(results)} requests, {len(failed)} failed (in flight at a kill); back after "
          f"{recovered_since(ep_kill):.1f}s (worker) and {recovered_since(replica_kill):.1f}s (replica)")

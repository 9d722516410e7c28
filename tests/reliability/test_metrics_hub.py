"""The metrics hub and the licensing merge actor survive faults; /metrics can require a key (issue 16, item 15).

The hub forgets a replica that stopped reporting (keeping its counter totals, so counters never go back), and is
restarted by Ray if its process dies; the merge actor's loop outlives a failing compaction; `/metrics` answers 401
without a key when `metrics_require_key` is set.
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation of the route.
import asyncio
import json
import os
import time

import httpx
import pytest
from fastapi import FastAPI, Request


def _snap(n_success: float, running: float = 1.0) -> dict:
    from serving.api.metrics import ReplicaMetrics

    m = ReplicaMetrics()
    m.inc("herd:request_success", n_success, "stop")
    m.gauges["herd:num_requests_running"] = running
    return m.snapshot()


def test_the_hub_forgets_gone_replicas_but_keeps_their_counts():
    from serving.api.metrics import FORGET_AFTER_S, MetricsHub

    now = [1000.0]
    hub = MetricsHub(clock=lambda: now[0])
    hub.report("a", _snap(3))
    hub.report("b", _snap(4))
    now[0] += FORGET_AFTER_S + 1
    hub.report("b", _snap(5))
    merged = hub.collect()
    assert set(hub.snapshots) == {"b"}  # "a" is forgotten...
    assert merged["counters"][("herd:request_success", "stop")] == 8  # ...but its 3 requests still count
    assert merged["gauges"]["herd:num_replicas"] == 1


def test_a_killed_hub_is_restarted(ray_cluster):
    import ray

    from serving.api.metrics import hub_handle

    hub = hub_handle("reliability-hub")
    ray.get(hub.report.remote("r1", _snap(1)))
    pid = ray.get(hub.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, 9)  # the hub's process dies (OOM killer, node trouble)
    time.sleep(2)
    deadline = time.time() + 60
    while True:
        try:
            ray.get(hub.report.remote("r1", _snap(2)), timeout=10)  # the handle replicas hold still works
            break
        except Exception:
            assert time.time() < deadline, "the metrics hub did not come back"
            time.sleep(1)
    ray.kill(hub, no_restart=True)


def test_the_merge_loop_outlives_a_failing_compaction(ray_cluster, tmp_path):
    import ray

    from licensing.merge import start_merge_actor

    store = tmp_path / "store"
    (store / "commits" / "x").mkdir(parents=True)
    (store / "commits" / "x" / "0-1.json").write_text("{not json")  # every compaction fails on it
    actor = start_merge_actor(str(store), interval_s=0.2, name="reliability-merge")
    try:
        time.sleep(2)
        runs, errors = ray.get(actor.stats.remote())
        assert runs >= 3 and errors >= runs - 1  # it kept trying (one may be under way)
        (store / "commits" / "x" / "0-1.json").unlink()
        time.sleep(1.5)
        runs_after, errors_after = ray.get(actor.stats.remote())
        assert runs_after - errors_after >= 2  # and succeeded once the store was fixed
    finally:
        ray.get(actor.stop.remote())
        ray.kill(actor)


def test_metrics_can_require_a_key():
    from serving.api.auth import KeyChecker, digest
    from serving.api.routes import OpenAIServer

    async def metrics() -> bytes:
        return b"herd:num_replicas 1\n"

    async def model(job):
        yield {}

    server = OpenAIServer("m", 64, model, metrics, KeyChecker({digest("sk-metrics-0123456789abcdef"): "ops"}),
                          None, metrics_require_key=True)
    web = FastAPI()

    @web.get("/metrics")
    async def m(request: Request):
        return await server.metrics(request)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://t") as c:
            return (await c.get("/metrics"),
                    await c.get("/metrics", headers={"Authorization": "Bearer sk-metrics-0123456789abcdef"}))

    denied, allowed = asyncio.run(go())
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "missing_api_key"
    assert allowed.status_code == 200 and b"num_replicas" in allowed.content

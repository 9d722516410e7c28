"""Across replicas and at scale: the exact Ray Data audit, replicas' flushes merged by a Ray actor."""
from __future__ import annotations

import numpy as np
import pytest

from licensing import ledger
from licensing.report import month_days
from licensing.synth import exact_distinct


@pytest.mark.slow
def test_exact_audit_equals_the_true_count(ray_cluster, million_log, million_store, capsys):
    import json

    from herd.cli import main as herd

    _, table = million_log
    truth = exact_distinct(table, *month_days("2025-03"))
    code = herd(["license", "report", "--store", str(million_store.root), "--release-date", "2025-04-05",
                 "--as-of", "2025-03-31", "--audit", "--json"])
    out = capsys.readouterr().out
    rep = json.loads(out[out.index("{\n"): out.rindex("}") + 1])
    assert code == 0
    audit = rep["audit"]
    assert audit["month"] == "2025-03"
    assert audit["company"] == truth["company"]
    assert audit["products"] == truth["products"]
    assert audit["affiliates"] == truth["affiliates"]
    assert audit["partitions"] == 64  # every hash partition counted on its own, then summed
    # The sketch's figure for the same month brackets the audited one.
    c = rep["question"]["company"]
    assert c["low_95"] <= audit["company"] <= c["high_95"]


@pytest.mark.slow
def test_replicas_flush_and_a_ray_actor_merges_them(ray_cluster, tmp_path, licensing_key):
    import ray

    from licensing.merge import start_merge_actor
    from licensing.store import LocalStore

    store_dir = str(tmp_path / "store")

    @ray.remote(num_cpus=0.1)
    class Replica:  # stands in for a Serve replica: one tracker each, on its own node
        def __init__(self, key):
            import os

            os.environ["HERD_LICENSING_KEY"] = key
            from licensing.tracker import MauTracker

            self.t = MauTracker(store=store_dir, flush_interval_s=3600, affiliate="acme")

        def serve(self, lo, hi):
            for i in range(lo, hi):
                self.t.record(f"user-{i}", "chat", 1741000000 + i)
            return self.t.flush()["events"]

        def shutdown(self):
            self.t.close()

    a = Replica.options(resources={"node0": 0.01}).remote(licensing_key)
    b = Replica.options(resources={"node1": 0.01}).remote(licensing_key)
    assert ray.get([a.serve.remote(0, 3000), b.serve.remote(2000, 5000)]) == [3000, 3000]
    ray.get([a.serve.remote(5000, 5200), b.shutdown.remote()])
    ray.get(a.shutdown.remote())

    store = LocalStore(store_dir)
    before = ledger.load_sketches(store)
    merger = start_merge_actor(store_dir, interval_s=3600, name="test-licensing-merge")
    record = ray.get(merger.compact.remote())
    assert len(record["covers"]) == 3 and store.list("snapshots/")
    assert ray.get(merger.compact.remote()) is None  # nothing new
    after = ledger.load_sketches(store)
    assert after.groups.keys() == before.groups.keys()
    assert all(np.array_equal(after.groups[k], before.groups[k]) for k in before.groups)
    # 5200 distinct users across both replicas, each counted once.
    from licensing.sketch import Estimate

    est = Estimate.of(after.union(), z=3)
    assert est.low <= 5200 <= est.high
    ray.get(merger.stop.remote())
    ray.kill(merger)

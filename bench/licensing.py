"""Licensing benchmark: ingest events/s per core from Parquet (keyed hashing included), the Ray Data exact audit's
per-worker throughput, sketch accuracy at 1M/10M/100M distinct users, and sketch bytes per product-day.

Each figure is printed next to a reference measured in the same run: the per-item path (keyed BLAKE2b per ID plus
DataSketches' per-item HLL update) for throughput, the exact count for accuracy, DataSketches' HLL for size.

    .venv/bin/python bench/licensing.py                 # full run (100M distinct users takes ~1 min)
    .venv/bin/python bench/licensing.py --quick         # 2M events, up to 10M distinct
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from datetime import date

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

KEY_HEX = "000102030405060708090a0b0c0d0e0f"


def bench_ingest(n_events: int, workdir: str) -> dict:
    """End-to-end ingest of one Parquet file on one core: read, hash, sketch, store durably."""
    from licensing.config import LicensingConfig
    from licensing.ingest import ingest_file
    from licensing.keyed_hash import load_key
    from licensing.store import LocalStore
    from licensing.synth import generate_events

    table = generate_events(n_events, n_events // 4, date(2025, 1, 1), 90, seed=1)
    path = os.path.join(workdir, "events.parquet")
    pq.write_table(table, path, row_group_size=1_000_000)
    pa.set_cpu_count(1)  # one core: Arrow's decode threads would otherwise use the other one
    pa.set_io_thread_count(1)
    store = LocalStore(os.path.join(workdir, "store"))
    wall, cpu = time.perf_counter(), time.process_time()
    ingest_file(store, path, load_key(KEY_HEX), LicensingConfig(chunk_rows=1_000_000))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    # Reference: the per-item path the issue measured (keyed BLAKE2b per ID + DataSketches update per item).
    from datasketches import hll_sketch, tgt_hll_type

    sample = table["user_id"].slice(0, 200_000).to_pylist()
    key = bytes.fromhex(KEY_HEX)
    sk = hll_sketch(14, tgt_hll_type.HLL_8)
    t = time.process_time()  # CPU time, like the ingest figure, so contention does not skew the ratio
    for uid in sample:
        sk.update(int.from_bytes(hashlib.blake2b(uid.encode(), key=key, digest_size=8).digest(), "little"))
    ref = len(sample) / (time.process_time() - t)
    return {"events": n_events, "wall_s": wall, "cpu_s": cpu, "events_per_s_per_core": n_events / cpu,
            "events_per_s_wall": n_events / wall, "reference_per_item_events_per_s": ref, "store": store}


def bench_audit(store, workers: int) -> dict:
    """The Ray Data exact audit over the stored events of March (hash-partitioned distinct count)."""
    import pyarrow.parquet as pq_

    import ray

    from licensing import ledger
    from licensing.audit import exact_counts
    from licensing.report import month_days

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        files = ledger.event_files(store, ["2025-03"])
        rows = sum(pq_.read_metadata(store.root / f).num_rows for f in files)
        exact_counts(store, *month_days("2025-03"), ["2025-03"], num_cpus=1)  # warm-up: worker start-up
        t = time.perf_counter()
        got = exact_counts(store, *month_days("2025-03"), ["2025-03"], num_cpus=1)
        wall = time.perf_counter() - t
    finally:
        ray.shutdown()
    # Reference: the same distinct count in one process with numpy.
    t = time.perf_counter()
    uids = np.concatenate([pq_.read_table(store.root / f, columns=["uid"])["uid"].to_numpy() for f in files])
    local = len(np.unique(uids))
    local_s = time.perf_counter() - t
    assert local == got["company"], (local, got["company"])
    return {"rows": rows, "wall_s": wall, "rows_per_s_per_worker": rows / wall / workers, "workers": workers,
            "distinct": got["company"], "numpy_one_process_rows_per_s": rows / local_s}


def bench_accuracy(sizes: list[int]) -> list[dict]:
    """Estimate vs exact for n distinct user IDs pushed through the real hashing and register path."""
    from datasketches import hll_sketch, tgt_hll_type

    from licensing.keyed_hash import hash_ids, load_key
    from licensing.sketch import Estimate, SketchSet

    key = load_key(KEY_HEX)
    out = []
    for n in sizes:
        s = SketchSet(14, "bench")
        ds = hll_sketch(14, tgt_hll_type.HLL_4) if n <= 10_000_000 else None
        t = time.perf_counter()
        for a in range(0, n, 4_000_000):
            ids = pa.array(np.arange(a, min(n, a + 4_000_000), dtype=np.int64) + 10**12)
            h = hash_ids(key, ids)
            z = np.zeros(len(h), dtype=np.int64)
            s.update(h, ["p"], z, [""], z, z)
            if ds is not None:
                for x in h.tolist():
                    ds.update(x)
        e = Estimate.of(s.union())
        one_group = SketchSet(14, "bench", {("p", "", 0): s.union()}).to_bytes()
        out.append({"distinct": n, "estimate": e.value, "rel_error": e.value / n - 1, "low_95": e.low,
                    "high_95": e.high, "within_95": e.low <= n <= e.high, "seconds": time.perf_counter() - t,
                    "datasketches_rel_error": (ds.get_estimate() / n - 1) if ds else None,
                    "bytes_per_product_day": len(one_group),
                    "datasketches_hll4_bytes": len(ds.serialize_compact()) if ds else None})
    return out


def bench_throughput(n_events: int, workers: int) -> None:
    """Ingest, then audit what was ingested; prints both lines."""
    with tempfile.TemporaryDirectory() as d:
        ing = bench_ingest(n_events, d)
        print(f"ingest: {ing['events']:,} events from Parquet in {ing['wall_s']:.2f} s wall, {ing['cpu_s']:.2f} s CPU"
              f" -> {ing['events_per_s_per_core'] / 1e6:.2f} M events/s per core "
              f"({ing['events_per_s_wall'] / 1e6:.2f} M/s wall); per-item reference (keyed BLAKE2b + DataSketches"
              f" update) {ing['reference_per_item_events_per_s'] / 1e6:.3f} M/s -> ratio "
              f"{ing['events_per_s_per_core'] / ing['reference_per_item_events_per_s']:.1f}x")
        pa.set_cpu_count(os.cpu_count() or 2)
        aud = bench_audit(ing["store"], workers)
        print(f"audit: {aud['rows']:,} stored events (March) counted exactly by Ray Data in {aud['wall_s']:.2f} s "
              f"with {aud['workers']} workers -> {aud['rows_per_s_per_worker'] / 1e6:.3f} M rows/s per worker; "
              f"one-process numpy reference {aud['numpy_one_process_rows_per_s'] / 1e6:.2f} M rows/s; "
              f"distinct {aud['distinct']:,} (equal to the reference)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (2M events, up to 10M distinct)")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated distinct counts for the accuracy part")
    ap.add_argument("--accuracy-only", action="store_true", help="skip the ingest and audit parts")
    args = ap.parse_args()
    n_events = args.events or (2_000_000 if args.quick else 5_000_000)
    sizes = [1_000, 100_000, 1_000_000, 10_000_000] + ([] if args.quick else [100_000_000])
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    if not args.accuracy_only:
        bench_throughput(n_events, args.workers)
    for r in bench_accuracy(sizes):
        ds = "" if r["datasketches_rel_error"] is None else f"; DataSketches HLL {r['datasketches_rel_error']:+.4%}"
        size = ("" if r["datasketches_hll4_bytes"] is None
                else f" (DataSketches HLL_4 compact: {r['datasketches_hll4_bytes']} B)")
        print(f"accuracy: {r['distinct']:>11,} distinct -> estimate {r['estimate']:,.0f} ({r['rel_error']:+.4%}), "
              f"95% [{r['low_95']:,.0f}, {r['high_95']:,.0f}] contains truth: {r['within_95']}{ds}; "
              f"sketch bytes per product-day {r['bytes_per_product_day']}{size}; {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()

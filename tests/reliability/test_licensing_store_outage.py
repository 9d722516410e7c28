"""The licensing store's S3 server stops during live recording and comes back: every event whose flush was
acknowledged (its marker written) is counted afterwards, and so is everything recorded during the outage.

The outage is the real server process frozen (SIGSTOP: connections hang, as with a partitioned network) and then
resumed (SIGCONT); moto keeps its state in memory, so it is paused rather than killed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from herd_testing import free_port, wait_port

pytestmark = pytest.mark.slow


@pytest.fixture
def own_s3_server(monkeypatch):
    """A moto server of this test's own (stopping the session's would break other tests)."""
    import boto3

    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, os.environ.get(var, value))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="licensing")
        yield proc, endpoint
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


def _counted(store) -> set[int]:
    import io

    import pyarrow.parquet as pq

    from licensing import ledger

    return {u for m in ledger.markers(store).values() for f in m["event_files"]
            for u in pq.read_table(io.BytesIO(store.get(f))).column("uid").to_pylist()}


def test_every_acknowledged_event_counts_after_an_outage(own_s3_server, tmp_path):
    from licensing import MauTracker
    from licensing.keyed_hash import hash_one
    from licensing.store import S3Store

    proc, endpoint = own_s3_server
    store = S3Store("s3://licensing/mau", endpoint, timeout_s=1.0)
    tracker = MauTracker(store="s3://licensing/mau", key="00112233445566778899aabbccddeeff", flush_interval_s=0.2,
                         replica="outage", spill_dir=str(tmp_path / "spill"), max_buffered_events=50)
    tracker._store = store
    recorded: list[str] = []
    acked: list[dict] = []
    real_flush = tracker.flush

    def flush():  # what the tracker acknowledged: the markers its flushes returned
        marker = real_flush()
        if marker is not None:
            acked.append(marker)
        return marker

    tracker.flush = flush
    stop = threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            user = f"user-{i}"
            tracker.record(user, "chat")
            recorded.append(user)
            i += 1
            time.sleep(0.005)

    t = threading.Thread(target=traffic)
    t.start()
    time.sleep(1.5)
    acked_before = len(acked)
    os.kill(proc.pid, signal.SIGSTOP)  # the store stops answering mid-recording
    time.sleep(3)
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(2)
    stop.set()
    t.join()
    tracker.close()
    assert acked_before > 0, "nothing was flushed before the outage"
    from licensing import ledger

    markers = ledger.markers(store)
    assert all(any(m == acked_marker for m in markers.values()) for acked_marker in acked), \
        "an acknowledged flush's marker is gone"
    counted = _counted(store)
    key = tracker._key
    assert {hash_one(key, u) for u in recorded} <= counted, \
        f"{len({hash_one(key, u) for u in recorded} - counted)} of {len(recorded)} recorded users are not counted"
    assert tracker.dropped_events == 0

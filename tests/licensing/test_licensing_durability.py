"""Licensing durability under store faults (issue 16, item 14).

A flush that fails part-way loses nothing recorded after it; the tracker's memory is bounded while the store is
down (spilled to local disk, then dropped with a count and a log line); two compactions at once never drop a
marker; new directories are fsynced. Faults come from a real LocalStore wrapped to fail or pause chosen writes,
as an S3 outage or a slow writer would.
"""
from __future__ import annotations

import os
import threading

import pyarrow.parquet as pq
import pytest

from licensing import MauTracker, ledger
from licensing.merge import compact
from licensing.sketch import estimate
from licensing.store import LocalStore


class FaultyStore:
    """A LocalStore whose `put` raises for paths matching `fail` while `down` is set."""

    def __init__(self, inner, fail=lambda path: False):
        self.inner, self.fail, self.down = inner, fail, True
        self.uri = inner.uri

    def put(self, path, data):
        if self.down and self.fail(path):
            raise ConnectionError(f"store unavailable while writing {path}")
        return self.inner.put(path, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _counted_uids(store) -> set[int]:
    """Every hashed user a commit marker acknowledges (exact, from the events it names)."""
    return {u for m in ledger.markers(store).values() for f in m["event_files"]
            for u in pq.read_table(os.path.join(store.root, f)).column("uid").to_pylist()}


def _tracker(tmp_path, store, **kw):
    t = MauTracker(store=str(tmp_path / "unused"), flush_interval_s=0, replica="r1", **kw)
    t._store = store
    return t


def test_a_flush_that_fails_part_way_loses_nothing_recorded_after(tmp_path):
    local = LocalStore(str(tmp_path / "store"))
    store = FaultyStore(local, fail=lambda p: p.startswith("commits/"))  # events and sketch written, marker not
    t = _tracker(tmp_path, store)
    for u in ("a", "b"):
        t.record(u, "chat")
    with pytest.raises(ConnectionError):
        t.flush()
    store.down = False
    t.record("c", "chat")
    assert t.flush() is not None
    from licensing.keyed_hash import hash_one

    assert _counted_uids(local) == {hash_one(t._key, u) for u in "abc"}


def test_memory_is_bounded_while_the_store_is_down_then_spilled_events_count(tmp_path, caplog):
    local = LocalStore(str(tmp_path / "store"))
    store = FaultyStore(local, fail=lambda p: True)
    spill = tmp_path / "spill"
    t = _tracker(tmp_path, store, max_buffered_events=100, spill_dir=str(spill), max_spill_bytes=40_000)
    for i in range(3000):
        t.record(f"user-{i}", "chat")
        assert len(t._buf) <= 100
    assert any(spill.iterdir())  # the overflow went to local disk
    assert t.dropped_events > 0 and "dropped" in caplog.text  # past the spill limit: counted and said
    kept = 3000 - t.dropped_events
    store.down = False
    t.flush()
    assert len(_counted_uids(local)) == kept
    assert not any(spill.iterdir())  # spilled events were committed, then removed


def test_two_compactions_at_once_never_drop_a_marker(tmp_path):
    local = LocalStore(str(tmp_path / "store"))
    t = _tracker(tmp_path, local)
    for i in range(3):
        t.record(f"early-{i}", "chat")
        t.flush()
    reached, go = threading.Event(), threading.Event()

    class Paused(FaultyStore):
        def put(self, path, data):
            if path.startswith("snapshots/") and path.endswith(".json"):
                reached.set()
                go.wait(30)  # compaction A stalls just before its commit point
            return self.inner.put(path, data)

    a = threading.Thread(target=compact, args=(Paused(local),))
    a.start()
    assert reached.wait(30)
    t.record("late", "chat")
    t.flush()
    compact(local)  # compaction B runs to the end meanwhile
    go.set()
    a.join(30)
    compact(local)
    total = round(estimate(ledger.load_sketches(local).union()))
    assert total == 4, f"counted {total} users of 4"


def test_new_directories_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    LocalStore(str(tmp_path / "store")).put("a/b/c/x.bin", b"x")
    for d in ("store", "store/a", "store/a/b"):  # each parent of a directory made by this put
        assert str(tmp_path / d) in synced, synced

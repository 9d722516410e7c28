"""The live tracker: cheap to construct, hashes at once, flushes on an interval and at close, agrees with ingest."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from herd.errors import UserError
from licensing import MauTracker, ledger
from licensing.config import LicensingConfig
from licensing.ingest import ingest_file
from licensing.keyed_hash import load_key
from licensing.store import LocalStore


def _stored_uids(store) -> np.ndarray:
    return np.concatenate([pq.read_table(store.root / f)["uid"].to_numpy() for f in ledger.event_files(store)])


def test_construction_does_no_io_and_starts_no_thread(tmp_path):
    threads = threading.active_count()
    t = MauTracker(store=str(tmp_path / "store"), affiliate="acme-eu")
    assert not (tmp_path / "store").exists() and threading.active_count() == threads
    t.close()  # nothing recorded: nothing written
    assert not (tmp_path / "store").exists()


def test_times_affiliates_and_flush_on_close(tmp_path):
    store = LocalStore(str(tmp_path))
    with MauTracker(store=str(tmp_path), affiliate="acme-eu", flush_interval_s=3600) as t:
        t.record("u1", "chat", datetime(2025, 3, 31, 23, 59, tzinfo=timezone.utc))
        t.record("u1", "chat", datetime(2025, 4, 1, 1, 0, tzinfo=timezone(timedelta(hours=2))))  # 23:00Z on 31st
        t.record("u2", "chat", datetime(2025, 4, 1, 0, 0))  # naive: UTC
        t.record("u3", "search", 1743465600.0, affiliate="")
        t.record("u4", "search")  # now
    groups = ledger.load_sketches(store).groups
    today = int(time.time() // 86400)
    assert set(groups) == {("chat", "acme-eu", 20178), ("chat", "acme-eu", 20179), ("search", "", 20179),
                           ("search", "acme-eu", today)}
    assert len(_stored_uids(store)) == 5
    with pytest.raises(RuntimeError):
        t.record("u5", "chat")


def test_interval_flush_happens_without_close(tmp_path):
    t = MauTracker(store=str(tmp_path), flush_interval_s=0.2)
    t.record("u1", "chat", 1741000000)
    deadline = time.time() + 10
    while not LocalStore(str(tmp_path)).list("commits/") and time.time() < deadline:
        time.sleep(0.05)
    assert LocalStore(str(tmp_path)).list("commits/"), "no flush within 10 s at a 0.2 s interval"
    t.close()


def test_live_and_bulk_hashes_of_a_user_agree(tmp_path):
    ids = [f"user-{i}" for i in range(2000)]
    pq.write_table(pa.table({"user_id": ids, "timestamp": [1741000000] * 2000, "product": ["chat"] * 2000}),
                   tmp_path / "log.parquet")
    store = LocalStore(str(tmp_path / "s"))
    ingest_file(store, str(tmp_path / "log.parquet"), load_key(), LicensingConfig())
    with MauTracker(store=str(tmp_path / "s"), flush_interval_s=3600) as t:
        for uid in ids[1000:] + [f"new-{i}" for i in range(500)]:
            t.record(uid, "chat", 1741000000)
    assert len(np.unique(_stored_uids(store))) == 2500  # 1000 live users already seen in bulk count once


def test_concurrent_records_are_all_kept(tmp_path):
    t = MauTracker(store=str(tmp_path), flush_interval_s=0.05)

    def work(k):
        for i in range(1500):
            t.record(f"t{k}-{i}", "chat", 1741000000)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t.close()
    uids = _stored_uids(LocalStore(str(tmp_path)))
    assert len(uids) == 6000 and len(np.unique(uids)) == 6000


def test_no_key_no_tracker(tmp_path, monkeypatch):
    monkeypatch.delenv("HERD_LICENSING_KEY")
    with pytest.raises(UserError, match="HERD_LICENSING_KEY"):
        MauTracker(store=str(tmp_path))
    MauTracker(LicensingConfig(key="ab" * 16), store=str(tmp_path)).close()


def test_compact_snapshot_plus_later_flushes_equals_everything(tmp_path, capsys):
    from herd.cli import main as herd

    store = LocalStore(str(tmp_path))
    for r in ("r1", "r2"):
        with MauTracker(store=str(tmp_path), replica=r, flush_interval_s=3600) as t:
            for i in range(400):
                t.record(f"{r}-{i}", "chat", 1741000000)
    before = ledger.load_sketches(store)
    assert herd(["license", "compact", "--store", str(tmp_path)]) == 0
    assert "snapshot 0 covers 2 commits" in capsys.readouterr().out
    assert herd(["license", "compact", "--store", str(tmp_path)]) == 0
    assert "nothing new" in capsys.readouterr().out
    with MauTracker(store=str(tmp_path), replica="r3", flush_interval_s=3600) as t:  # after the snapshot
        for i in range(400):
            t.record(f"r3-{i}", "mail", 1741000000)
    after = ledger.load_sketches(store)
    assert all(np.array_equal(after.groups[k], before.groups[k]) for k in before.groups)
    assert set(after.groups) == set(before.groups) | {("mail", "", 1741000000 // 86400)}

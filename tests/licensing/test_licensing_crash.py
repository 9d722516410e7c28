"""A writer killed with SIGKILL mid-ingest loses no acknowledged event; the re-run completes without double counts."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import date

import numpy as np
import pyarrow.parquet as pq
import pytest

from licensing import ledger
from licensing.config import LicensingConfig
from licensing.ingest import canonical_source, ingest_file
from licensing.keyed_hash import load_key
from licensing.store import LocalStore
from licensing.synth import generate_events

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _herd(*args, **kw):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen([sys.executable, "-m", "herd", "license", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigkill_mid_ingest_loses_no_acknowledged_event(tmp_path):
    table = generate_events(200_000, 50_000, date(2025, 3, 1), 31, seed=21)
    log = tmp_path / "log.parquet"
    pq.write_table(table, log)
    (tmp_path / "cfg.yaml").write_text("chunk_rows: 1000\n")
    store_dir = tmp_path / "store"
    proc = _herd("ingest", str(log), "-v", "--config", str(tmp_path / "cfg.yaml"), "--store", str(store_dir))
    acked = []
    deadline = time.time() + 120
    while len(acked) < 15 and time.time() < deadline:
        line = proc.stdout.readline()
        m = re.match(r"acked .* rows (\d+)-(\d+) \((\d+) events\)", line)
        if m:
            acked.append((int(m[1]), int(m[2])))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert len(acked) >= 15

    store = LocalStore(str(store_dir))
    committed = ledger.committed_ranges(store, canonical_source(str(log)))
    for a, b in acked:  # every acknowledged range is in the store after the crash
        assert any(ca <= a and b <= cb for ca, cb in committed), (a, b, committed)
    assert sum(b - a for a, b in committed) < table.num_rows, "nothing left for the re-run to do"

    rerun = _herd("ingest", str(log), "--config", str(tmp_path / "cfg.yaml"), "--store", str(store_dir))
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    done = ledger.committed_ranges(store, canonical_source(str(log)))
    assert ledger.uncovered(0, table.num_rows, done) == []
    stored = sum(pq.read_metadata(store.root / f).num_rows for f in ledger.event_files(store))
    assert stored == table.num_rows  # each row stored exactly once

    clean = LocalStore(str(tmp_path / "clean"))
    ingest_file(clean, str(log), load_key(), LicensingConfig(chunk_rows=50_000))
    want, got = ledger.load_sketches(clean), ledger.load_sketches(store)
    assert want.groups.keys() == got.groups.keys()
    assert all(np.array_equal(want.groups[k], got.groups[k]) for k in want.groups)


@pytest.mark.slow
def test_sigkill_after_a_tracker_flush_keeps_the_flushed_events(tmp_path):
    script = (
        "import sys, time\n"
        "from licensing.tracker import MauTracker\n"
        f"t = MauTracker(store={str(tmp_path / 'store')!r}, flush_interval_s=3600, replica='r1')\n"
        "for i in range(500): t.record(f'user-{i}', 'chat', 1741000000)\n"
        "t.flush(); print('flushed', flush=True)\n"
        "for i in range(500, 900): t.record(f'user-{i}', 'chat', 1741000000)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "flushed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = LocalStore(str(tmp_path / "store"))
    marks = list(ledger.markers(store).values())
    assert [m["events"] for m in marks] == [500]  # the acknowledged flush survived; unflushed events were not acked

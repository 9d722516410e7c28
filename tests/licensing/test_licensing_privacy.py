"""No raw user ID anywhere in the store or in what herd prints or logs, from bulk ingest or the live tracker."""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from herd.cli import main as herd
from licensing.sketch import SketchSet
from licensing.tracker import MauTracker

MARK = "zq7-raw-id"


def _readable_forms(path: Path) -> list[bytes]:
    """The file's bytes plus its decoded content (Parquet values, decompressed sketch registers)."""
    raw = path.read_bytes()
    forms = [raw]
    if path.suffix == ".parquet":
        t = pq.read_table(path)
        forms.append(" ".join(str(v) for c in t.columns for v in c.to_pylist()).encode())
        forms.append(str(pq.read_metadata(path).metadata).encode())
    if path.suffix == ".hll":
        s = SketchSet.from_bytes(raw)
        forms.append(repr(sorted(s.groups)).encode())
        forms.extend(r.tobytes() for r in s.groups.values())
    return forms


def test_no_raw_user_id_in_storage_or_output(tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    ids = [f"{MARK}-{i:05d}@example.com" for i in range(3000)]
    pq.write_table(pa.table({"user_id": ids, "timestamp": [1741000000 + i for i in range(3000)],
                             "product": ["chat"] * 3000, "affiliate": ["acme"] * 3000}), tmp_path / "log.parquet")
    store = tmp_path / "store"
    assert herd(["license", "ingest", str(tmp_path / "log.parquet"), "-v", "--store", str(store)]) == 0
    with MauTracker(store=str(store), flush_interval_s=3600) as t:
        for uid in ids[:500] + [f"{MARK}-live-{i}" for i in range(500)]:
            t.record(uid, "chat", 1741000000)
    assert herd(["license", "report", "--store", str(store), "--release-date", "2025-04-05", "--json"]) == 0
    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    assert "3,000 new events" in text  # the commands did run and print
    assert MARK not in text
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.suffix == ".hll" for p in files)
    for p in files:
        for form in _readable_forms(p):
            assert MARK.encode() not in form, p
            assert b"example.com" not in form, p

"""Bulk ingest: every monthly figure on 1M generated events lies within 3-sigma bounds; re-ingest is idempotent."""
from __future__ import annotations

import json
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from herd.cli import main as herd
from licensing import ledger
from licensing.config import LicensingConfig, load_config
from licensing.ingest import ingest_file
from licensing.keyed_hash import load_key
from licensing.report import month_days, period_figures
from licensing.sketch import Estimate
from licensing.store import LocalStore
from licensing.synth import exact_distinct, generate_events

MONTHS = ["2025-01", "2025-02", "2025-03"]


def _figures_3sigma(sketches, lo, hi):
    """Company/product/affiliate estimates with bounds at 3 standard errors."""
    keep = lambda k: lo <= k[2] <= hi  # noqa: E731
    out = {"company": Estimate.of(sketches.union(keep), z=3)}
    for i, scope in ((0, "products"), (1, "affiliates")):
        names = {k[i] for k in sketches.groups if keep(k)}
        out[scope] = {(n or "(licensee)") if i else n: Estimate.of(
            sketches.union(lambda k, n=n, i=i: keep(k) and k[i] == n), z=3) for n in names}
    return out


def test_every_monthly_figure_lies_within_its_bounds(million_log, million_store):
    _, table = million_log
    sketches = ledger.load_sketches(million_store)
    checked = 0
    for month in MONTHS:
        lo, hi = month_days(month)
        truth = exact_distinct(table, lo, hi)
        est = _figures_3sigma(sketches, lo, hi)
        assert est["company"].low <= truth["company"] <= est["company"].high, (month, truth, est["company"])
        for scope in ("products", "affiliates"):
            assert est[scope].keys() == truth[scope].keys()
            for name, n in truth[scope].items():
                e = est[scope][name]
                assert e.low <= n <= e.high, (month, scope, name, n, e)
                checked += 1
        # Users are shared: the company figure is well below the sum of the products'.
        assert truth["company"] < 0.8 * sum(truth["products"].values())
    assert checked == 3 * 5
    # The report's 95% figures are built from the same registers.
    fig = period_figures(sketches, *month_days("2025-03"))["company"]
    assert fig["low_95"] <= exact_distinct(table, *month_days("2025-03"))["company"] <= fig["high_95"]


def test_reingesting_the_same_file_adds_nothing(million_log, tmp_path):
    path, table = million_log
    store, key = LocalStore(str(tmp_path / "s")), load_key()
    first = ingest_file(store, str(path), key, LicensingConfig(chunk_rows=300_000))
    before = ledger.load_sketches(store)
    files = store.list("")
    again = ingest_file(store, str(path), key, LicensingConfig(chunk_rows=300_000))
    # A different chunk size on the re-run still skips exactly the committed rows.
    third = ingest_file(store, str(path), key, LicensingConfig(chunk_rows=70_000))
    assert first["events"] == table.num_rows and again["events"] == 0 and third["events"] == 0
    assert store.list("") == files
    after = ledger.load_sketches(store)
    assert all(np.array_equal(after.groups[k], v) for k, v in before.groups.items())
    stored = sum(pq.read_metadata(store.root / f).num_rows for f in ledger.event_files(store))
    assert stored == table.num_rows


def test_jsonl_and_parquet_of_the_same_events_give_the_same_sketches(tmp_path):
    table = generate_events(20_000, 5_000, date(2025, 3, 1), 31, seed=4)
    pq.write_table(table, tmp_path / "a.parquet")
    with open(tmp_path / "a.jsonl", "w") as f:
        for row in table.to_pylist():
            row["timestamp"] = row["timestamp"].isoformat().replace("+00:00", "Z")
            f.write(json.dumps(row) + "\n")
    key = load_key()
    sa, sb = LocalStore(str(tmp_path / "sa")), LocalStore(str(tmp_path / "sb"))
    ingest_file(sa, str(tmp_path / "a.parquet"), key, LicensingConfig(chunk_rows=4000))
    ingest_file(sb, str(tmp_path / "a.jsonl"), key, LicensingConfig(chunk_rows=4000))
    a, b = ledger.load_sketches(sa), ledger.load_sketches(sb)
    assert a.groups.keys() == b.groups.keys()
    assert all(np.array_equal(a.groups[k], b.groups[k]) for k in a.groups)
    assert len(ledger.markers(sb)) > 1  # JSONL went in several byte-range chunks


def test_epoch_seconds_custom_column_names_and_missing_affiliate(tmp_path):
    t = pa.table({"uid": [1, 2, 2, 3], "ts": [1740787200.5, 1740787300, 1740873600, 1743465600],
                  "svc": ["chat", "chat", "chat", "mail"]})
    pq.write_table(t, tmp_path / "x.parquet")
    (tmp_path / "cfg.yaml").write_text("columns: {user_id: uid, timestamp: ts, product: svc}\n")
    cfg = load_config(tmp_path / "cfg.yaml")
    store = LocalStore(str(tmp_path / "s"))
    assert ingest_file(store, str(tmp_path / "x.parquet"), load_key(), cfg)["events"] == 4
    groups = ledger.load_sketches(store).groups
    assert set(groups) == {("chat", "", 20148), ("chat", "", 20149), ("mail", "", 20179)}


def test_ingest_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    pq.write_table(pa.table({"user": ["a"], "timestamp": [1740787200], "product": ["p"]}), tmp_path / "x.parquet")
    assert herd(["license", "ingest", str(tmp_path / "x.parquet"), "--store", str(tmp_path / "s")]) == 2
    assert "no column 'user_id' (columns.user_id)" in capsys.readouterr().err
    assert herd(["license", "ingest", str(tmp_path / "nope.parquet"), "--store", str(tmp_path / "s")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("colums: {}\n")
    assert herd(["license", "ingest", "x.parquet", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean 'columns'" in capsys.readouterr().err
    pq.write_table(pa.table({"user_id": ["a"], "timestamp": [1740787200000], "product": ["p"]}),
                   tmp_path / "ms.parquet")
    assert herd(["license", "ingest", str(tmp_path / "ms.parquet"), "--store", str(tmp_path / "s")]) == 2
    assert "milliseconds" in capsys.readouterr().err
    monkeypatch.delenv("HERD_LICENSING_KEY")
    assert herd(["license", "ingest", str(tmp_path / "x.parquet"), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd: error: no licensing key") and "Traceback" not in err


def test_a_store_refuses_data_hashed_with_another_key(tmp_path, capsys, monkeypatch):
    pq.write_table(pa.table({"user_id": ["a"], "timestamp": [1740787200], "product": ["p"]}), tmp_path / "x.parquet")
    store = str(tmp_path / "s")
    assert herd(["license", "ingest", str(tmp_path / "x.parquet"), "--store", store]) == 0
    monkeypatch.setenv("HERD_LICENSING_KEY", "ff" * 16)
    pq.write_table(pa.table({"user_id": ["b"], "timestamp": [1740787200], "product": ["p"]}), tmp_path / "y.parquet")
    assert herd(["license", "ingest", str(tmp_path / "y.parquet"), "--store", store]) == 2
    assert "hashed with another key" in capsys.readouterr().err

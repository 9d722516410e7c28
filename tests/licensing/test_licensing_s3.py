"""Storage on a real S3-protocol server (moto, loopback) through boto3: logs in, store, tracker, report."""
from __future__ import annotations

import io
import json
from datetime import date

import boto3
import pytest
import pyarrow.parquet as pq

from herd.cli import main as herd
from licensing import MauTracker, ledger
from licensing.store import S3Store
from licensing.synth import generate_events


@pytest.mark.slow
def test_ingest_from_s3_into_an_s3_store_matches_a_local_store(s3_bucket, tmp_path, capsys, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    table = generate_events(30_000, 8_000, date(2025, 3, 1), 31, seed=5)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.put_object(Bucket=bucket, Key="logs/march.parquet", Body=buf.getvalue())
    pq.write_table(table, tmp_path / "march.parquet")

    remote = f"s3://{bucket}/licensing"
    assert herd(["license", "ingest", f"s3://{bucket}/logs/march.parquet", "--store", remote]) == 0
    assert "30,000 new events" in capsys.readouterr().out
    assert herd(["license", "ingest", f"s3://{bucket}/logs/march.parquet", "--store", remote]) == 0
    assert "0 new events" in capsys.readouterr().out  # idempotent on S3 too
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="licensing/")["Contents"]]
    assert any(k.startswith("licensing/commits/") for k in keys) and any(k.endswith(".parquet") for k in keys)

    assert herd(["license", "ingest", str(tmp_path / "march.parquet"), "--store", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    args = ["--release-date", "2025-04-05", "--as-of", "2025-03-31", "--json"]
    assert herd(["license", "report", "--store", remote, *args]) == 0
    from_s3 = json.loads(capsys.readouterr().out)
    assert herd(["license", "report", "--store", str(tmp_path / "local"), *args]) == 0
    assert json.loads(capsys.readouterr().out) == from_s3
    assert from_s3["question"]["company"]["estimate"] > 7000


def test_tracker_flushes_to_s3_with_an_explicit_endpoint(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    from licensing.config import LicensingConfig

    cfg = LicensingConfig(store=f"s3://{bucket}/live", endpoint_url=endpoint, flush_interval_s=3600)
    for replica in ("r1", "r2"):
        with MauTracker(cfg, replica=replica) as t:
            for i in range(300):
                t.record(f"user-{i + (100 if replica == 'r2' else 0)}", "chat", 1741000000)
    store = S3Store(f"s3://{bucket}/live", endpoint)
    assert len(ledger.markers(store)) == 2
    # A second put of an existing object is refused by the server (If-None-Match) and left alone.
    path = store.list("sketches/")[0]
    before = store.get(path)
    assert store.put(path, b"overwrite attempt") is False and store.get(path) == before
    from licensing.sketch import Estimate

    est = Estimate.of(ledger.load_sketches(store).union(), z=3)
    assert est.low <= 400 <= est.high

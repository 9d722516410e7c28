"""Fixtures for licensing tests: a key, a generated 1M-event log with its exact answers, a store holding it."""
from __future__ import annotations

import math
import os
import sys
from datetime import date

import numpy as np
import pytest

# This folder is itself named "licensing" and pytest puts tests/ on sys.path, so without the repository root ahead
# of it `import licensing` becomes a namespace package without the package's __init__ (MauTracker, NOTICE_TEXT).
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if sys.path[0] != _REPO:
    sys.path.insert(0, _REPO)
if getattr(sys.modules.get("licensing"), "__file__", "") is None:  # a namespace import happened before us
    del sys.modules["licensing"]
import licensing  # noqa: E402,F401  (the real package, from here on)

TEST_KEY = "000102030405060708090a0b0c0d0e0f"
MONTHS = ["2025-01", "2025-02", "2025-03"]


@pytest.fixture(autouse=True)
def licensing_key(monkeypatch):
    """Every licensing test runs with a known key in the environment (tests that need none remove it)."""
    monkeypatch.setenv("HERD_LICENSING_KEY", TEST_KEY)
    return TEST_KEY


@pytest.fixture(scope="session")
def million_log(tmp_path_factory):
    """1M events over Jan-Mar 2025, 3 products, 2 affiliates, users shared across them: (parquet path, table)."""
    import pyarrow.parquet as pq

    from licensing.synth import generate_events

    table = generate_events(1_000_000, 400_000, date(2025, 1, 1), 90, growth=1.0, seed=11)
    path = tmp_path_factory.mktemp("log") / "activity.parquet"
    pq.write_table(table, path, row_group_size=250_000)
    return path, table


@pytest.fixture(scope="session")
def million_store(million_log, tmp_path_factory):
    """A local store with the 1M-event log ingested once (chunks of 200K rows)."""
    from licensing.config import LicensingConfig
    from licensing.ingest import ingest_file
    from licensing.keyed_hash import load_key
    from licensing.store import LocalStore

    store = LocalStore(str(tmp_path_factory.mktemp("store")))
    ingest_file(store, str(million_log[0]), load_key(TEST_KEY), LicensingConfig(chunk_rows=200_000))
    return store


def synthetic_registers(n: float, lg_k: int, rng: np.random.Generator) -> np.ndarray:
    """HLL registers distributed exactly as after n random distinct hashes (Poissonised), without hashing n items.

    Register j's value is the maximum rank among Poisson(n/m) items, so P(value <= k) = exp(-(n/m) 2^-k);
    we sample it by inverting that CDF. This lets tests reach 600M-800M users in microseconds.
    """
    m = 1 << lg_k
    lam = n / m
    u = rng.random(m)
    with np.errstate(divide="ignore"):
        k = np.ceil(np.log2(lam / -np.log(u)))
    k = np.clip(k, 0, 64 - lg_k + 1)
    return k.astype(np.uint8)


def write_month_sketches(store, users_by_month: dict[str, float], lg_k: int = 14, seed: int = 0) -> None:
    """Commit one synthetic sketch per month (as product 'chat', licensee, on the month's 10th day)."""
    from licensing import ledger
    from licensing.keyed_hash import key_id, load_key
    from licensing.report import month_days
    from licensing.sketch import SketchSet

    rng = np.random.default_rng(seed)
    kid = key_id(load_key(TEST_KEY))
    for i, (month, n) in enumerate(sorted(users_by_month.items())):
        day = month_days(month)[0] + 9
        s = SketchSet(lg_k, kid, {("chat", "", day): synthetic_registers(n, lg_k, rng)})
        empty = ledger.events_table(np.empty(0, np.uint64), np.empty(0, np.int64), ["chat"], np.empty(0, np.int64),
                                    [""], np.empty(0, np.int64))
        ledger.commit(store, f"synthetic:{month}", i, i + 1, "flush", empty, s)


def three_sigma(lg_k: int = 14) -> float:
    return 3 * 1.04 / math.sqrt(1 << lg_k)


@pytest.fixture
def fake_registers():
    """`synthetic_registers` as a fixture (test modules do not import conftest, whose name other folders share)."""
    return synthetic_registers


@pytest.fixture
def month_sketches():
    """`write_month_sketches` as a fixture."""
    return write_month_sketches

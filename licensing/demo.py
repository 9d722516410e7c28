"""What `make demo` shows for licensing: ingest a small generated log, print the MAU report table."""
from __future__ import annotations

import os
from datetime import date
from pathlib import Path

# The demo's users are synthetic, so a public key is harmless here; real stores need HERD_LICENSING_KEY.
DEMO_KEY = "herd-demo-key-synthetic-users-only"


def demo_report(store_dir: str, n_events: int = 50_000, release_date: date = date(2025, 4, 5)) -> str:
    """Generate a 3-month log (Jan-Mar 2025), ingest it into `store_dir`, return the report table text.

    Uses HERD_LICENSING_KEY when set, else a fixed demo key. Re-running is harmless: ingest is idempotent.
    """
    import pyarrow.parquet as pq

    from licensing.config import LicensingConfig
    from licensing.ingest import check_key_matches, ingest_file
    from licensing.keyed_hash import load_key
    from licensing.ledger import load_sketches
    from licensing.report import build_report, format_table
    from licensing.store import LocalStore
    from licensing.synth import generate_events

    key = load_key(os.environ.get("HERD_LICENSING_KEY") or DEMO_KEY)
    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "demo-activity-log.parquet"
    if not log.exists():
        pq.write_table(generate_events(n_events, n_events // 4, date(2025, 1, 1), 90, growth=1.0, seed=7), log)
    store = LocalStore(str(root / "store"))
    check_key_matches(store, key)
    ingest_file(store, str(log), key, LicensingConfig(chunk_rows=20_000))
    rep = build_report(load_sketches(store), release_date, date(2025, 3, 31), [50.0, 80.0, 90.0, 100.0])
    return format_table(rep)

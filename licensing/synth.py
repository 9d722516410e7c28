"""Synthetic product activity logs with known distinct counts, for the demo, the tests and the benchmark.

Users are drawn from a pool and each product and affiliate sees an overlapping subset, so company-wide counts are
smaller than the sum of per-product counts, as in real companies. The exact answers come from the table itself.
"""
from __future__ import annotations

from datetime import date, datetime, timezone

import numpy as np


def generate_events(n_events: int, n_users: int, start: date, days: int, products=("chat", "search", "mail"),
                    affiliates=("", "acme-eu"), seed: int = 0, growth: float = 0.0):
    """A pyarrow table of n_events (user_id, timestamp, product, affiliate) over `days` days from `start`.

    `growth` > 0 makes later days draw from a larger share of the user pool (a rising MAU trend).
    """
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    day = np.sort(rng.integers(0, days, n_events))
    share = 1.0 / (1.0 + growth) + (1.0 - 1.0 / (1.0 + growth)) * (day + 1) / days
    uid = (rng.random(n_events) * share * n_users).astype(np.int64)
    # Products favour different slices of the pool, so users overlap across products but not completely.
    prod = (rng.integers(0, len(products), n_events) + (uid % 7 == 0)) % len(products)
    aff = np.where(uid % 5 == 0, len(affiliates) - 1, rng.integers(0, len(affiliates), n_events))
    t0 = int(datetime(start.year, start.month, start.day, tzinfo=timezone.utc).timestamp())
    ts = t0 + day * 86400 + rng.integers(0, 86400, n_events)
    ids = pa.array(np.char.add("user-", uid.astype("U12")).astype(object), pa.string())
    return pa.table({
        "user_id": ids,
        "timestamp": pa.array(ts, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
        "product": pa.DictionaryArray.from_arrays(pa.array(prod.astype(np.int32)), pa.array(list(products))),
        "affiliate": pa.DictionaryArray.from_arrays(pa.array(aff.astype(np.int32)), pa.array(list(affiliates))),
    })


def exact_distinct(table, lo_day: int, hi_day: int) -> dict:
    """True distinct raw user IDs over days [lo, hi]: company, per product, per affiliate."""
    import pyarrow as pa
    import pyarrow.compute as pc

    day = pc.floor(pc.divide(pc.cast(pc.cast(table["timestamp"], pa.timestamp("s")), pa.int64()).cast(pa.float64()),
                             86400.0))
    t = table.filter(pc.and_(pc.greater_equal(day, lo_day), pc.less_equal(day, hi_day)))
    t = t.set_column(2, "product", pc.cast(t["product"], pa.string()))
    t = t.set_column(3, "affiliate", pc.cast(t["affiliate"], pa.string()))
    out = {"company": pc.count_distinct(t["user_id"]).as_py(), "products": {}, "affiliates": {}}
    for col, key in (("product", "products"), ("affiliate", "affiliates")):
        agg = t.group_by(col).aggregate([("user_id", "count_distinct")])
        for name, n in zip(agg[col].to_pylist(), agg["user_id_count_distinct"].to_pylist()):
            out[key][(name or "(licensee)") if col == "affiliate" else name] = n
    return out

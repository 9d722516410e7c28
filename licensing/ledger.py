"""The store's layout and its commit protocol: what counts is exactly what a commit marker names.

    events/month=YYYY-MM/<source>-<start>-<end>.parquet   hashed events (uid uint64, day, product, affiliate)
    sketches/<source>-<start>-<end>.hll                    HLL registers per (product, affiliate, day)
    commits/<source>/<start>-<end>.json                    the marker: written last, it acknowledges the chunk
    snapshots/<seq>-<id>.hll + <seq>.json                  a merge of many sketches and the markers it covers

A chunk (rows [start, end) of a Parquet file, bytes [start, end) of a JSONL file, or one flush of a live tracker)
writes its events and sketch first, then its marker; each write is durable before the next (see store.py). A crash
before the marker leaves orphans nobody reads; the retry writes the same names, so nothing counts twice and
re-ingesting a file skips every committed range.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from licensing.sketch import SketchSet


def source_id(source: str) -> str:
    """A short stable name for an input (file URI or live replica) used in object names."""
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def _month_of_day(day: np.ndarray) -> np.ndarray:
    """Calendar month of each day number, via a table over the batch's day range (days span little)."""
    lo = int(day.min())
    table = np.arange(lo, int(day.max()) + 1).astype("datetime64[D]").astype("datetime64[M]")
    return table[day - lo]


def events_table(hashes: np.ndarray, day: np.ndarray, products: list[str], product_code: np.ndarray,
                 affiliates: list[str], affiliate_code: np.ndarray):
    """The stored form of a batch of events: the keyed hash, the UTC day and dictionary-coded names."""
    import pyarrow as pa

    return pa.table({
        "uid": pa.array(hashes, pa.uint64()),
        "day": pa.array(day.astype(np.int32), pa.int32()),
        "product": pa.DictionaryArray.from_arrays(pa.array(product_code.astype(np.int32)), pa.array(products)),
        "affiliate": pa.DictionaryArray.from_arrays(pa.array(affiliate_code.astype(np.int32)),
                                                    pa.array(affiliates)),
    })


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    # Random 64-bit hashes neither dictionary-encode nor compress: only the name columns get a dictionary.
    pq.write_table(table, sink, compression="lz4", use_dictionary=["product", "affiliate"])
    return sink.getvalue()


def commit(store, source: str, start: int, end: int, unit: str, events, sketches: SketchSet) -> dict:
    """Durably store one chunk's events and sketch, then its marker; returns the marker once acknowledged."""
    sid = source_id(source)
    name = f"{sid}-{start:016d}-{end:016d}"
    event_files = []
    if events.num_rows:
        months = _month_of_day(events.column("day").to_numpy())
        for month in np.unique(months):
            rows = np.flatnonzero(months == month)
            path = f"events/month={str(month)}/{name}.parquet"
            part = events if len(rows) == events.num_rows else events.take(rows)
            store.put(path, _parquet_bytes(part))
            event_files.append(path)
    sketch_path = f"sketches/{name}.hll"
    store.put(sketch_path, sketches.to_bytes())
    marker = {"source": source, "start": start, "end": end, "unit": unit, "events": events.num_rows,
              "event_files": event_files, "sketch": sketch_path, "key_id": sketches.key_id}
    store.put(f"commits/{sid}/{start:016d}-{end:016d}.json", json.dumps(marker).encode())
    return marker


def committed_ranges(store, source: str) -> list[tuple[int, int]]:
    """The [start, end) ranges of `source` already acknowledged, sorted."""
    out = []
    for path in store.list(f"commits/{source_id(source)}/"):
        a, _, b = path.rsplit("/", 1)[1].removesuffix(".json").partition("-")
        out.append((int(a), int(b)))
    return sorted(out)


def uncovered(start: int, end: int, done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) that no range in `done` covers."""
    out, pos = [], start
    for a, b in done:
        if b <= pos or a >= end:
            continue
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < end:
        out.append((pos, end))
    return out


def markers(store) -> dict[str, dict]:
    """Every commit marker in the store, by its path."""
    return {p: json.loads(store.get(p)) for p in store.list("commits/")}


def latest_snapshot(store) -> dict | None:
    metas = [p for p in store.list("snapshots/") if p.endswith(".json")]
    return json.loads(store.get(metas[-1])) if metas else None


def load_sketches(store, lg_k: int | None = None) -> SketchSet:
    """The merge of every committed sketch (the latest snapshot plus the markers it does not cover)."""
    snap = latest_snapshot(store)
    covered = set(snap["covers"]) if snap else set()
    total = SketchSet.from_bytes(store.get(snap["sketch"])) if snap else None
    for path in store.list("commits/"):
        if path in covered:  # listed but never read: snapshots keep reports cheap as flushes pile up
            continue
        marker = json.loads(store.get(path))
        part = SketchSet.from_bytes(store.get(marker["sketch"]))
        if total is None:
            total = part
        else:
            total.merge(part)
    if total is None:
        return SketchSet(lg_k) if lg_k else SketchSet()
    return total


def event_files(store, months: list[str] | None = None) -> list[str]:
    """Stored event files named by a commit marker, optionally only those of the given YYYY-MM months."""
    files = [f for m in markers(store).values() for f in m["event_files"]]
    if months is not None:
        wanted = {f"events/month={m}/" for m in months}
        files = [f for f in files if f[: len("events/month=YYYY-MM/")] in wanted]
    return sorted(files)

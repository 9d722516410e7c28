"""Bulk ingest of product activity logs (Parquet or JSONL, local or s3://) into hashed events and sketches.

Each file is read in chunks (row ranges of Parquet, line-aligned byte ranges of JSONL). A chunk is hashed with the
key, folded into per-(product, affiliate, day) sketches and committed (ledger.py); only then is it acknowledged.
Ranges already committed for the same file are skipped, so re-running an ingest, after a crash or by mistake,
never counts an event twice. Raw user IDs exist only inside the chunk being hashed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from common.errors import UserError
from licensing import ledger
from licensing.config import Columns, LicensingConfig
from licensing.keyed_hash import hash_ids, key_id
from licensing.sketch import SketchSet

SECONDS_PER_DAY = 86400
_JSONL_BYTES_PER_ROW = 96  # sizes a JSONL chunk so it holds about chunk_rows lines


@dataclass
class Batch:
    """A batch of hashed events ready to store: n hashes, days and name codes."""

    hashes: np.ndarray  # uint64 [n]
    day: np.ndarray  # int64 [n], days since 1970-01-01 UTC
    products: list[str]
    product_code: np.ndarray  # [n] into products
    affiliates: list[str]
    affiliate_code: np.ndarray  # [n] into affiliates


def _codes(col, what: str, null_as: str | None) -> tuple[list[str], np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if col.null_count:
        if null_as is None:
            raise UserError(f"{col.null_count} events have no {what}; fill the column or drop those rows")
        col = pc.fill_null(pc.cast(col, pa.string()), null_as)
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(pc.cast(col, pa.string()))
    names = [str(x) for x in col.dictionary.to_pylist()]
    return names, col.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def to_days(col, name: str = "timestamp") -> np.ndarray:
    """UTC day numbers of a timestamp column: Arrow timestamps/dates, epoch seconds, or ISO-8601 text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if col.null_count:
        raise UserError(f"{col.null_count} events have no {name}; every event needs its time")
    t = col.type
    if pa.types.is_date(t):
        return pc.cast(pc.cast(col, pa.date32()), pa.int32()).to_numpy().astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            col = pc.cast(col, pa.timestamp("s", tz="UTC"))
        except pa.ArrowInvalid as e:
            raise UserError(f"column {name!r}: cannot read times as ISO-8601 ({e}); "
                            "use e.g. 2025-03-01T12:00:00Z or epoch seconds") from None
        t = col.type
    if pa.types.is_timestamp(t):
        secs = pc.cast(pc.cast(col, pa.timestamp("s", tz=t.tz), safe=False), pa.int64()).to_numpy()
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        secs = np.floor(col.to_numpy(zero_copy_only=False)).astype(np.int64)
        if secs.size and np.abs(secs).max() > 10**11:
            raise UserError(f"column {name!r} holds numbers like {int(secs.max())}: that looks like milliseconds; "
                            "herd reads numeric times as epoch seconds")
    else:
        raise UserError(f"column {name!r} has type {t}; use a timestamp, epoch seconds or ISO-8601 text")
    return np.floor_divide(secs, SECONDS_PER_DAY)


def batch_from_table(table, key: bytes, columns: Columns) -> Batch:
    """Hash and encode a table of raw events; the user ID column is dropped here and goes nowhere else."""
    have = set(table.column_names)
    for field in ("user_id", "timestamp", "product"):
        col = getattr(columns, field)
        if col not in have:
            raise UserError(f"log has no column {col!r} (columns.{field}); it has {sorted(have)}: "
                            f"set columns.{field} in the licensing config")
    hashes = hash_ids(key, table.column(columns.user_id))
    day = to_days(table.column(columns.timestamp), columns.timestamp)
    products, pcode = _codes(table.column(columns.product), "product", None)
    if columns.affiliate in have:
        affiliates, acode = _codes(table.column(columns.affiliate), "affiliate", "")
    else:
        affiliates, acode = [""], np.zeros(table.num_rows, dtype=np.int64)
    return Batch(hashes, day, products, pcode, affiliates, acode)


def commit_batch(store, source: str, start: int, end: int, unit: str, batch: Batch, lg_k: int, kid: str) -> dict:
    """Sketch a hashed batch and commit it with its events; returns the acknowledged marker."""
    sketches = SketchSet(lg_k, kid)
    sketches.update(batch.hashes, batch.products, batch.product_code, batch.affiliates, batch.affiliate_code,
                    batch.day)
    events = ledger.events_table(batch.hashes, batch.day, batch.products, batch.product_code, batch.affiliates,
                                 batch.affiliate_code)
    return ledger.commit(store, source, start, end, unit, events, sketches)


def canonical_source(path: str) -> str:
    return path if path.startswith("s3://") else os.path.realpath(path)


def _open(source: str, endpoint_url: str | None):
    if source.startswith("s3://"):
        from licensing.store import pyarrow_s3

        return pyarrow_s3(endpoint_url).open_input_file(source[len("s3://"):])
    if not os.path.isfile(source):
        raise UserError(f"log file {source!r} not found")
    return open(source, "rb")


def _parquet_chunks(f, columns: Columns, chunk_rows: int, done) -> Iterator[tuple[int, int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = set(pf.schema_arrow.names)
    wanted = [c for c in (columns.user_id, columns.timestamp, columns.product, columns.affiliate) if c in names]
    row = 0
    for rg in range(pf.num_row_groups):
        rg_start, row = row, row + pf.metadata.row_group(rg).num_rows
        if not ledger.uncovered(rg_start, row, done):
            continue
        pos = rg_start
        for rb in pf.iter_batches(batch_size=chunk_rows, row_groups=[rg], columns=wanted):
            s, e = pos, pos + rb.num_rows
            pos = e
            for a, b in ledger.uncovered(s, e, done):
                yield a, b, pa.Table.from_batches([rb]).slice(a - s, b - a)


def _jsonl_chunks(f, chunk_rows: int, done) -> Iterator[tuple[int, int, object]]:
    import io

    import pyarrow.json as pj

    block = max(1 << 16, chunk_rows * _JSONL_BYTES_PER_ROW)
    pos, carry = 0, b""
    while True:
        data = f.read(block)
        buf = carry + data
        if not buf:
            return
        cut = buf.rfind(b"\n") + 1 if data else len(buf)
        if cut == 0:  # one line longer than a block: keep reading
            carry = buf
            continue
        chunk, carry = buf[:cut], buf[cut:]
        s, e = pos, pos + len(chunk)
        pos = e
        for a, b in ledger.uncovered(s, e, done):
            piece = chunk[a - s : b - s]
            if piece.strip():
                try:
                    table = pj.read_json(io.BytesIO(piece))
                except Exception as err:  # pyarrow's parse errors name the line problem
                    raise UserError(f"JSONL bytes {a}-{b}: not valid JSON lines ({err})") from None
                yield a, b, table
        if not data:
            return


def ingest_file(store, path: str, key: bytes, config: LicensingConfig,
                on_ack: Callable[[dict], None] | None = None) -> dict:
    """Ingest one log file chunk by chunk; returns {"source", "events", "skipped_ranges"}. Idempotent."""
    source = canonical_source(path)
    lower = source.lower()
    if lower.endswith((".parquet", ".pq")):
        kind, unit = "parquet", "rows"
    elif lower.endswith((".jsonl", ".ndjson", ".json")):
        kind, unit = "jsonl", "bytes"
    else:
        raise UserError(f"{path!r}: unknown log format; name Parquet files *.parquet and JSON lines *.jsonl")
    done = ledger.committed_ranges(store, source)
    kid = key_id(key)
    total = 0
    with _open(source, config.endpoint_url) as f:
        chunks = (_parquet_chunks(f, config.columns, config.chunk_rows, done) if kind == "parquet"
                  else _jsonl_chunks(f, config.chunk_rows, done))
        for a, b, table in chunks:
            batch = batch_from_table(table, key, config.columns)
            del table
            marker = commit_batch(store, source, a, b, unit, batch, config.lg_k, kid)
            total += marker["events"]
            if on_ack:
                on_ack(marker)
    return {"source": source, "events": total, "already_committed_ranges": len(done)}


def check_key_matches(store, key: bytes) -> None:
    """Refuse to add data hashed with a different key than the store's: the same user would count twice."""
    import json

    kid = key_id(key)
    for path in store.list("commits/")[:1]:
        theirs = json.loads(store.get(path)).get("key_id")
        if theirs and theirs != kid:
            raise UserError(
                f"store {store.uri} holds IDs hashed with another key (key id {theirs}, yours {kid}); "
                "set HERD_LICENSING_KEY to the store's key, or use a new store"
            )

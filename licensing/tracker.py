"""The live recorder serving calls once per request: `MauTracker.record(user_id, product, timestamp)`.

Each call hashes the ID at once (SipHash-2-4 with the licensing key, ~20-30 us in Python: noise next to an LLM
request) and keeps only the hash, the day and the product in memory. Every `flush_interval_s`, and at `close()`,
a background flush commits them to the store as one chunk of events plus its sketch (ledger.py): sketches from all
replicas then merge by register max, in any order. `flush()` returns once that chunk is durable: what a caller
may treat as acknowledged. Events recorded since the last flush are lost if the process is killed.

Construction does no I/O and starts no thread (the flusher starts on the first `record`), so it is cheap and safe
inside a Ray Serve replica's `__init__`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from licensing.config import LicensingConfig
from licensing.keyed_hash import hash_one, key_id, load_key

log = logging.getLogger(__name__)


def _epoch_seconds(timestamp) -> float:
    if timestamp is None:
        return time.time()
    if isinstance(timestamp, datetime):
        if timestamp.tzinfo is None:  # naive datetimes are taken as UTC, like the bulk logs
            timestamp = timestamp.replace(tzinfo=timezone.utc)
        return timestamp.timestamp()
    return float(timestamp)


class _Buffer:
    """Hashed events since the last flush, as Python lists (append is the cheapest per-request cost)."""

    def __init__(self):
        self.hashes: list[int] = []
        self.days: list[int] = []
        self.pairs: list[int] = []  # index into the tracker's (product, affiliate) table

    def __len__(self) -> int:
        return len(self.hashes)


class MauTracker:
    """Counts monthly active users from live traffic; one per serving replica (or per process)."""

    def __init__(self, config: LicensingConfig | None = None, *, affiliate: str | None = None,
                 store: str | None = None, key: str | bytes | None = None,
                 flush_interval_s: float | None = None, replica: str | None = None,
                 max_buffered_events: int | None = None, spill_dir: str | None = None,
                 max_spill_bytes: int | None = None):
        self.config = config or LicensingConfig()
        secret = key if key is not None else (self.config.key.get_secret_value() if self.config.key else None)
        self._key = secret if isinstance(secret, bytes) else load_key(secret)
        self._key_id = key_id(self._key)
        self.affiliate = affiliate if affiliate is not None else self.config.affiliate
        self._store_uri = store or self.config.store
        self._store = None
        self.interval = flush_interval_s if flush_interval_s is not None else self.config.flush_interval_s
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pairs: dict[tuple[str, str], int] = {}
        self._buf = _Buffer()
        self._seq = 0
        self.max_buffered = max_buffered_events or self.config.max_buffered_events
        self.max_spill_bytes = self.config.max_spill_bytes if max_spill_bytes is None else max_spill_bytes
        self._spill_dir = spill_dir or self.config.spill_dir  # made on first spill
        self._spilled_bytes = 0
        self.dropped_events = 0  # events lost because memory and spill were both full (store down for long)
        self._lock = threading.Lock()  # guards _buf and _pairs: record() may come from many threads
        self._flush_lock = threading.Lock()  # one flush at a time, so sequence numbers stay ordered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Flush what is buffered when the interpreter exits normally, even if nobody calls close().
        self._finalizer = weakref.finalize(self, MauTracker._flush_at_exit, weakref.ref(self))

    @property
    def store(self):
        if self._store is None:
            from licensing.store import open_store

            self._store = open_store(self._store_uri, self.config.endpoint_url)
        return self._store

    def record(self, user_id: str, product: str, timestamp: datetime | float | None = None,
               affiliate: str | None = None) -> None:
        """Note that `user_id` used `product` at `timestamp` (default now). Keeps only the keyed hash."""
        if self._closed:
            raise RuntimeError("MauTracker.record after close()")
        h = hash_one(self._key, user_id)
        day = int(_epoch_seconds(timestamp) // 86400)
        pair = (product, self.affiliate if affiliate is None else affiliate)
        with self._lock:
            code = self._pairs.setdefault(pair, len(self._pairs))
            self._buf.hashes.append(h)
            self._buf.days.append(day)
            self._buf.pairs.append(code)
            full = len(self._buf) >= self.max_buffered
        if full:
            self._spill_buffer()
        if self._thread is None and self.interval:
            self._start_flusher()

    # ---- bounded memory: spill to local disk, then drop (counted) ---------------------------------------------
    def _spill_path(self) -> Path:
        if self._spill_dir is None:
            from serving.expert_parallel.s3 import cache_root

            self._spill_dir = str(cache_root() / "licensing-spill")
        folder = Path(self._spill_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _spill_buffer(self) -> None:
        """Move the in-memory buffer to a spill file (or drop it, counted, when the spill is full)."""
        with self._lock:
            if len(self._buf) < self.max_buffered:
                return
            buf, self._buf = self._buf, _Buffer()
            names = sorted(self._pairs, key=self._pairs.get)
        data = io.BytesIO()
        np.savez(data, hashes=np.array(buf.hashes, dtype=np.uint64), days=np.array(buf.days, dtype=np.int64),
                 pairs=np.array(buf.pairs, dtype=np.int64), names=np.array(json.dumps(names)))
        blob = data.getvalue()
        if self._spilled_bytes + len(blob) > self.max_spill_bytes:
            self.dropped_events += len(buf)
            log.error("licensing: store unreachable and spill full (%d bytes): dropped %d events, %d in all; these "
                      "users are not counted", self._spilled_bytes, len(buf), self.dropped_events)
            return
        folder = self._spill_path()
        final = folder / f"{self.replica}-{time.time_ns():020d}.npz"
        tmp = final.with_suffix(".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, final)
        self._spilled_bytes += len(blob)
        log.warning("licensing: %d events spilled to %s until the store is back", len(buf), folder)

    def _spilled_files(self) -> list[Path]:
        if self._spill_dir is None or not Path(self._spill_dir).is_dir():
            return []
        return sorted(Path(self._spill_dir).glob(f"{self.replica}-*.npz"))

    def _start_flusher(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="herd-mau-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # a store outage must not kill serving; the buffer is kept for the next try
                log.exception("licensing flush to %s failed; will retry", self._store_uri)

    def flush(self) -> dict | None:
        """Commit what was recorded since the last flush; returns the marker once durable (None if nothing)."""
        with self._flush_lock:
            for path in self._spilled_files():  # what overflowed while the store was down goes first
                z = np.load(path)
                self._commit(z["hashes"], z["days"], z["pairs"], json.loads(str(z["names"])))
                self._spilled_bytes = max(0, self._spilled_bytes - path.stat().st_size)
                path.unlink()
            with self._lock:
                buf, self._buf = self._buf, _Buffer()
                names = sorted(self._pairs, key=self._pairs.get)
            if not buf:
                return None
            try:
                return self._commit(np.array(buf.hashes, dtype=np.uint64), np.array(buf.days, dtype=np.int64),
                                    np.array(buf.pairs, dtype=np.int64), names)
            except Exception:
                self._restore(buf)
                if len(self._buf) >= self.max_buffered:
                    self._spill_buffer()
                raise

    def _commit(self, hashes, days, pairs, names) -> dict:
        """One chunk under the next sequence number. Any attempt uses a number of its own, failed or not: a
        failure may leave part of the chunk written, and a retry under the same names would keep those parts
        (writes are no-clobber) and lose what was recorded since."""
        from licensing.ingest import Batch, commit_batch

        names = [tuple(n) for n in names]
        products = sorted({p for p, _ in names})
        affiliates = sorted({a for _, a in names})
        pcode_of = np.array([products.index(p) for p, _ in names], dtype=np.int64)
        acode_of = np.array([affiliates.index(a) for _, a in names], dtype=np.int64)
        batch = Batch(hashes, days, products, pcode_of[pairs], affiliates, acode_of[pairs])
        seq, self._seq = self._seq, self._seq + 1
        return commit_batch(self.store, f"live:{self.replica}", seq, seq + 1, "flush", batch, self.config.lg_k,
                            self._key_id)

    def _restore(self, buf: _Buffer) -> None:
        with self._lock:
            self._buf.hashes[:0] = buf.hashes
            self._buf.days[:0] = buf.days
            self._buf.pairs[:0] = buf.pairs

    def close(self) -> None:
        """Stop the flusher and flush what is left (durable on return)."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()
        self._closed = True
        self._finalizer.detach()

    @staticmethod
    def _flush_at_exit(ref) -> None:
        tracker = ref()
        if tracker is not None and not tracker._closed:
            try:
                tracker.close()
            except Exception:
                log.exception("licensing: final flush failed")

    def __enter__(self) -> "MauTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

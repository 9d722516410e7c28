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

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from datetime import datetime, timezone

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
                 flush_interval_s: float | None = None, replica: str | None = None):
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
        if self._thread is None and self.interval:
            self._start_flusher()

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
        from licensing.ingest import Batch, commit_batch

        with self._flush_lock:
            with self._lock:
                buf, self._buf = self._buf, _Buffer()
                names = sorted(self._pairs, key=self._pairs.get)
            if not buf:
                return None
            products = sorted({p for p, _ in names})
            affiliates = sorted({a for _, a in names})
            pcode_of = np.array([products.index(p) for p, _ in names], dtype=np.int64)
            acode_of = np.array([affiliates.index(a) for _, a in names], dtype=np.int64)
            pairs = np.array(buf.pairs, dtype=np.int64)
            batch = Batch(np.array(buf.hashes, dtype=np.uint64), np.array(buf.days, dtype=np.int64),
                          products, pcode_of[pairs], affiliates, acode_of[pairs])
            try:
                marker = commit_batch(self.store, f"live:{self.replica}", self._seq, self._seq + 1, "flush",
                                      batch, self.config.lg_k, self._key_id)
            except Exception:
                self._restore(buf)
                raise
            self._seq += 1
            return marker

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

"""Merging replicas' flushed sketches into snapshots, as a function, a Ray task or a long-lived Ray actor.

Every serving replica flushes its own small sketch files; reading thousands of them per report is slow, so a merge
job folds all committed sketches not yet covered into a new snapshot (`snapshots/<seq>.hll`) plus a record of the
markers it covers (`snapshots/<seq>.json`, written last: the snapshot counts only once that exists). Nothing is
deleted or rewritten; readers take the newest snapshot and the markers it does not cover (ledger.load_sketches).
Merging is max over registers, so the result is the same whatever order replicas flushed in.
"""
from __future__ import annotations

import json
import logging
import uuid

from licensing import ledger

log = logging.getLogger(__name__)


def compact(store, attempts: int = 10) -> dict | None:
    """Write a new snapshot covering every committed marker; returns its record (None if nothing new).

    Safe to run several at once: each writes its sketch under a name of its own, and the record `<seq>.json` (the
    commit point) is written no-clobber; a compaction that loses the race for a seq starts again from the winner's
    snapshot, so no marker is ever covered by a record whose sketch lacks it."""
    for _ in range(attempts):
        snap = ledger.latest_snapshot(store)
        covered = set(snap["covers"]) if snap else set()
        marks = ledger.markers(store)
        new = sorted(p for p in marks if p not in covered)
        if not new:
            return None
        merged = ledger.load_sketches(store)
        seq = (snap["seq"] + 1) if snap else 0
        sketch_path = f"snapshots/{seq:08d}-{uuid.uuid4().hex[:12]}.hll"
        store.put(sketch_path, merged.to_bytes())
        record = {"seq": seq, "sketch": sketch_path, "covers": sorted(covered | set(new)),
                  "groups": len(merged.groups)}
        if store.put(f"snapshots/{seq:08d}.json", json.dumps(record).encode()):
            return record
    raise RuntimeError(f"compaction lost the race for a snapshot number {attempts} times; run it again")


def compact_on_ray(store_uri: str, endpoint_url: str | None = None) -> dict | None:
    """Run `compact` as a Ray task (on whichever node has a CPU to spare) and wait for it."""
    import ray

    @ray.remote(num_cpus=0.25)
    def _job(uri, endpoint):
        from licensing.store import open_store

        return compact(open_store(uri, endpoint))

    return ray.get(_job.remote(store_uri, endpoint_url))


def start_merge_actor(store_uri: str, interval_s: float = 300.0, endpoint_url: str | None = None,
                      name: str = "herd-licensing-merge"):
    """A detached, named Ray actor that compacts every `interval_s`; returns its handle.

    Detached: it outlives the driver that started it (stop it with `stop()` then `ray.kill`). Restarted by Ray if
    its process dies. A failing compaction (store down, a damaged file) is logged and counted (`stats()`), and the
    loop goes on."""
    import ray

    @ray.remote(num_cpus=0.1)
    class MergeActor:
        def __init__(self, uri, endpoint, interval):
            import threading

            from licensing.store import open_store

            self.store = open_store(uri, endpoint)
            self.runs = 0
            self.errors = 0
            self._stop = threading.Event()
            threading.Thread(target=self._loop, args=(interval,), daemon=True).start()

        def _loop(self, interval):
            while not self._stop.wait(interval):
                try:
                    self.compact()
                except Exception as e:
                    log.error("licensing compaction failed (%s: %s); retrying in %g s", e.__class__.__name__,
                              str(e)[:200], interval)

        def compact(self):
            self.runs += 1
            try:
                return compact(self.store)
            except Exception:
                self.errors += 1
                raise

        def stats(self) -> tuple[int, int]:
            """(compactions tried, of which failed)."""
            return self.runs, self.errors

        def stop(self):
            self._stop.set()

    return MergeActor.options(name=name, get_if_exists=True, lifetime="detached", max_restarts=-1).remote(
        store_uri, endpoint_url, interval_s)

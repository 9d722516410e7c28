"""Who made each request, for the licence's monthly-active-user count, without ever logging who it was.

A request's user is the `user` field of its body, else its `X-User-Id` header, else the identity its API key maps
to, else "anonymous", when the operator trusts those fields (`trust_user_field`: on without API keys, off with
them). With keys and trust, the named user is namespaced by the key's identity (`team-a/alice`), so one key cannot
count as another key's users; without trust only the key's identity counts. A request is recorded once the model
has accepted it, never for a refused one. That ID goes to `licensing.MauTracker.record(user_id, product, timestamp)`, which hashes it
with the licensing key before keeping anything. Serving only ever logs `log_tag(user_id)`, a short keyed digest
that lets an operator correlate log lines without learning the ID.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

ANONYMOUS = "anonymous"
USER_HEADER = "x-user-id"
_LOG_SALT = os.urandom(16)  # per process: log tags correlate lines of one replica, not users across restarts

log = logging.getLogger("herd.serving.usage")


class Recorder(Protocol):
    def record(self, user_id: str, product: str, timestamp: float) -> None: ...


class NullRecorder:
    """Stands in while no licensing tracker is configured: same signature, stores nothing."""

    def record(self, user_id: str, product: str, timestamp: float) -> None:
        return None


def resolve_user(body_user: str | None, header_user: str | None, key_identity: str | None,
                 trust_user_field: bool = True) -> str:
    """The user this request counts for, by the rules in the module docstring."""
    if trust_user_field:
        for candidate in (body_user, header_user):
            if candidate is not None and candidate.strip():
                return f"{key_identity}/{candidate.strip()}" if key_identity else candidate.strip()
    if key_identity is not None and key_identity.strip():
        return key_identity.strip()
    return ANONYMOUS


def log_tag(user_id: str) -> str:
    """A keyed 8-hex-digit tag of a user ID, safe for logs."""
    return hashlib.blake2b(user_id.encode("utf-8"), key=_LOG_SALT, digest_size=4).hexdigest()


@dataclass(frozen=True)
class LicensingStatus:
    """Whether this process's environment lets serving count users for the licence, and where to."""

    counting: bool
    store: str  # an absolute folder or an s3:// URL
    message: str  # one line for the operator (no secret in it)


def licensing_status(store: str | None = None) -> LicensingStatus:
    """Read HERD_LICENSING_KEY / HERD_LICENSING_STORE (never echoing the key); a relative store folder is made
    absolute here, so every replica writes where the operator was told."""
    from licensing.keyed_hash import KEY_ENV
    from licensing.store import DEFAULT_STORE, STORE_ENV

    where = store or os.environ.get(STORE_ENV) or DEFAULT_STORE
    if "://" not in where:
        where = os.path.abspath(os.path.expanduser(where))
    if os.environ.get(KEY_ENV, "").strip():
        return LicensingStatus(True, where, f"licensing: counting users for the licence (keyed hashes) in {where}")
    return LicensingStatus(False, where, f"licensing: NOT counting users for the licence: {KEY_ENV} is not set in "
                                         f"the server's environment (set it and {STORE_ENV}; require_licensing / "
                                         "--require-licensing refuses to start without it)")


def make_recorder(store: str | None = None, required: bool = False) -> Recorder:
    """licensing's live MauTracker writing to `store` (default: the environment's), else a NullRecorder.

    The tracker reads its key from HERD_LICENSING_KEY. When it cannot start, serving still serves and says so
    loudly (without any user ID), unless `required`: then this raises, and the replica does not start.
    """
    from licensing import MauTracker

    status = licensing_status(store)
    try:
        tracker = MauTracker(store=status.store)
    except Exception as e:  # a missing key or store is an operator's setup step
        if required:
            raise RuntimeError(f"require_licensing is set but the licensing tracker cannot start "
                               f"({e.__class__.__name__}): {status.message}") from None
        log.warning("%s (tracker not started: %s)", status.message, e.__class__.__name__)
        return NullRecorder()
    log.warning("%s", status.message)
    return tracker


def record_safely(recorder: Recorder, user_id: str, product: str, timestamp: float | None = None) -> None:
    """Record one request; a licensing failure is logged (without the ID) and never fails the request."""
    try:
        recorder.record(user_id, product, time.time() if timestamp is None else timestamp)
    except Exception as e:
        log.error("licensing record failed for user %s: %s", log_tag(user_id), e.__class__.__name__)


def recorder_counters(recorder: Recorder) -> dict[tuple, float]:
    """The recorder's counters for /metrics: events it lost (`herd:licensing_dropped_events`); 0 for a NullRecorder
    (which is said once at start: no tracker, nothing counted)."""
    return {("herd:licensing_dropped_events",): float(getattr(recorder, "dropped_events", 0))}

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


def make_recorder() -> Recorder:
    """licensing's live MauTracker when it is available and configured, else a NullRecorder.

    The tracker reads its store and key from the environment (HERD_LICENSING_STORE / HERD_LICENSING_KEY); when
    they are missing serving still serves, and says once (without any user ID) that usage is not being recorded.
    """
    from licensing import MauTracker

    try:
        return MauTracker()
    except Exception as e:  # a missing key or store is an operator's setup step, not a reason to stop serving
        log.warning("licensing tracker not started (%s); requests are not counted for the licence",
                    e.__class__.__name__)
        return NullRecorder()


def record_safely(recorder: Recorder, user_id: str, product: str, timestamp: float | None = None) -> None:
    """Record one request; a licensing failure is logged (without the ID) and never fails the request."""
    try:
        recorder.record(user_id, product, time.time() if timestamp is None else timestamp)
    except Exception as e:
        log.error("licensing record failed for user %s: %s", log_tag(user_id), e.__class__.__name__)

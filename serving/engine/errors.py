"""Errors the engine raises to its callers (the HTTP server maps them to status codes)."""
from __future__ import annotations


class EngineError(RuntimeError):
    """Base class for engine failures that are not the caller's input mistakes."""


class WorkerDiedError(EngineError):
    """A model worker (an expert-parallel Ray actor) died during a step; the executor can be rebuilt."""


class QueueFullError(EngineError):
    """The async engine's waiting queue is at `max_waiting_requests`; the caller should retry later (HTTP 503)."""


class EngineDeadError(EngineError):
    """The engine loop stopped after an unrecoverable error; every later request fails with this."""

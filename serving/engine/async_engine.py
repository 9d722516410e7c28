"""`AsyncLLMEngine`: the engine loop in a background thread, each request an async iterator of deltas.

Model steps are long, blocking torch calls, so they run in one thread of their own; the asyncio side only
tokenizes, enqueues commands (add / abort) and receives deltas through `loop.call_soon_threadsafe`. The engine
object is touched by the loop thread alone, so it needs no lock. The waiting queue is bounded: when
`max_waiting_requests` requests are waiting, `add_request` raises `QueueFullError` at once (HTTP 503 upstream).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

from serving.engine.errors import EngineDeadError, QueueFullError
from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import RequestDelta
from serving.engine.params import SamplingParams

log = logging.getLogger(__name__)


class AsyncLLMEngine:
    """Streams `RequestDelta`s per request from an `LLMEngine` stepped in a background thread."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 256):
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._num_queued = 0  # requests handed to the loop thread and not yet running
        self._stopping = False
        self._dead: BaseException | None = None
        self.last_heartbeat = time.monotonic()  # when the loop thread last went round (cheap liveness signal)
        self._thread = threading.Thread(target=self._run, name="herd-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path, max_waiting_requests: int = 256, **engine_kwargs) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_pretrained(path, **engine_kwargs), max_waiting_requests)

    # ---- the asyncio side ------------------------------------------------------------------------
    @property
    def dead_reason(self) -> BaseException | None:
        """Why the engine loop stopped for good (requests then fail with EngineDeadError); None while it runs."""
        return self._dead

    def heartbeat_age(self) -> float:
        """Seconds since the loop thread last went round: under a second when idle, one step's time when busy."""
        return time.monotonic() - self.last_heartbeat

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.engine.apply_chat_template(messages)

    def chat_prompt(self, messages: list[dict]) -> dict:
        """A prompt dict (ids + images) for chat messages that may hold image parts; see `LLMEngine.chat_prompt`."""
        return self.engine.chat_prompt(messages)

    def num_waiting(self) -> int:
        return self._num_queued + len(self.engine.scheduler.waiting)

    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    sampling_params: SamplingParams | None = None,
                    cache_salt: str | None = None) -> AsyncIterator[RequestDelta]:
        """Start a request (call it from the event loop); `async for` over the result yields its deltas, the last
        with `finished` set (with n > 1 the samples' deltas interleave, told apart by `index`, each sample's last
        with its `finish_reason`). `prompt` may be a vLLM-style dict with images (`multi_modal_data`). Raises
        ValueError for bad input and QueueFullError when the waiting queue is full, at the call itself.
        """
        stream = self._submit(request_id, prompt, sampling_params, cache_salt)
        return self._iterate(request_id, stream)

    def _submit(self, request_id, prompt, params, cache_salt: str | None = None) -> asyncio.Queue:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._dead}")
        if self.num_waiting() >= self.max_waiting_requests:
            raise QueueFullError(f"{self.num_waiting()} requests are waiting (max_waiting_requests="
                                 f"{self.max_waiting_requests}); retry later")
        req = self.engine.make_request(request_id, prompt, params, cache_salt=cache_salt)
        stream: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
            self._num_queued += 1
        self._commands.put(("add", req))
        self._wake.set()
        return stream

    async def _iterate(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestDelta]:
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:  # with n > 1, each sample's last delta has a finish_reason; this is the last
                    return
        finally:
            # The consumer went away early (client disconnect): stop the request and free its cache.
            with self._streams_lock:
                still_open = self._streams.pop(request_id, None) is not None
            if still_open:
                self._commands.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with a delta whose finish_reason is "abort"."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self):
        return self.engine.stats()

    def routed_token_counts(self):
        return self.engine.routed_token_counts()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ---- the loop thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self.last_heartbeat = time.monotonic()
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for delta in self.engine.step_deltas():
                    self._deliver(delta.request_id, delta)
        except BaseException as exc:  # the loop must never die silently: fail every open stream
            log.exception("engine loop stopped")
            self._dead = exc
            with self._streams_lock:
                streams = list(self._streams.items())
            err = EngineDeadError(f"the engine loop stopped: {exc!r}")
            for rid, _ in streams:
                self._deliver(rid, err)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._streams_lock:
                    self._num_queued -= 1
                    wanted = arg.request_id in self._streams
                if wanted:  # else the caller gave up before the request reached the engine
                    try:
                        self.engine.add_request(arg.request_id, arg)
                    except Exception as exc:  # this request alone is refused; the loop goes on
                        self._deliver(arg.request_id, exc)
            else:
                self.engine.abort_request(arg)

    def _deliver(self, request_id: str, item) -> None:
        with self._streams_lock:
            target = self._streams.get(request_id)
            if isinstance(item, RequestDelta) and item.finished or isinstance(item, BaseException):
                self._streams.pop(request_id, None)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed
                pass

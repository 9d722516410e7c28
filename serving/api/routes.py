"""What each endpoint does, independent of Ray Serve: parse and check the request, call the model, shape the answer.

`OpenAIServer` is given a `generate` callable (request job dict -> async iterator of plain dict items, see
serving/app.py's `ModelServer.generate`) and a `metrics` callable, so the ingress deployment is a thin shell.
Every path returns OpenAI-shaped JSON, and every failure an `ApiError`: bad input never reaches the model as an
exception, and an unexpected failure is a 500 that names only a request id.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from pydantic import ValidationError

from serving.api import protocol as P
from serving.api.auth import KeyChecker
from serving.api.errors import ApiError, from_validation_error, internal_error, queue_full
from serving.usage import USER_HEADER, Recorder, log_tag, record_safely, resolve_user

MAX_BODY_BYTES = 8 * 1024 * 1024
ROOT_PAGE = ("<!doctype html><html><head><title>herd</title></head><body><h1>herd</h1>"
             "<p>OpenAI-compatible API: <code>POST /v1/chat/completions</code>, <code>POST /v1/completions</code>,"
             " <code>GET /v1/models</code>, <code>GET /health</code>, <code>GET /metrics</code>.</p>"
             "<p>Built with Llama</p></body></html>")

log = logging.getLogger("herd.serving.http")

Generate = Callable[[dict], AsyncIterator[dict]]


def is_backpressure(e: BaseException) -> bool:
    """Serve refused the call because every model replica's queue is full (max_queued_requests)."""
    from ray.serve.exceptions import BackPressureError

    return isinstance(e, BackPressureError)


def error_response(err: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


class OpenAIServer:
    """The endpoints' logic for one served model."""

    def __init__(self, model_name: str, max_model_len: int, generate: Generate,
                 metrics: Callable[[], Awaitable[bytes]], keys: KeyChecker, recorder: Recorder,
                 is_backpressure: Callable[[BaseException], bool] = lambda e: False, retry_after_s: int = 1,
                 product: str = "llm-api", trust_user_field: bool | None = None):
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.generate = generate
        self.metrics_text = metrics
        self.keys = keys
        self.recorder = recorder
        self.is_backpressure = is_backpressure
        self.retry_after_s = retry_after_s
        self.product = product
        # Whether the body's `user` / X-User-Id count (serving/usage.py); default: only when there are no API keys.
        self.trust_user_field = (not keys.enabled) if trust_user_field is None else trust_user_field
        self.created = int(time.time())

    # ---- simple endpoints ------------------------------------------------------------------------------------
    async def models(self, request):
        from fastapi.responses import JSONResponse

        try:
            self.keys.identity(request.headers.get("authorization"))
        except ApiError as e:
            return error_response(e)
        return JSONResponse(P.model_list(self.model_name, self.max_model_len, self.created))

    async def metrics(self, request):
        from fastapi.responses import Response

        return Response(await self.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- generation --------------------------------------------------------------------------------------------
    async def chat(self, request):
        return await self._handle(request, "chat")

    async def completions(self, request):
        return await self._handle(request, "completion")

    async def _handle(self, request, kind: str):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            req, job, user = await self._accept(request, kind, rid)
            items = self.generate(job)
            first = await self._first(items, rid)
            record_safely(self.recorder, user, self.product)  # the model accepted it: now it counts
            if req.stream:
                return self._stream(req, kind, rid, first, items)
            return await self._whole(req, kind, rid, first, items)
        except ApiError as e:
            return error_response(e)
        except Exception as e:
            if self.is_backpressure(e):
                return error_response(queue_full(self.retry_after_s))
            log.exception("request %s failed", rid)
            return error_response(internal_error(rid))

    async def _accept(self, request, kind: str, rid: str):
        """Auth, body, fields, model name, user: everything checked before the model sees the request."""
        identity = self.keys.identity(request.headers.get("authorization"))
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"Request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}.",
                           code="body_too_large")
        schema = P.ChatCompletionRequest if kind == "chat" else P.CompletionRequest
        req = self._parse(schema, body)
        if req.model != self.model_name:
            raise ApiError(404, f"The model '{req.model[:100]}' does not exist; this server serves "
                                f"'{self.model_name}' (see GET /v1/models).", param="model", code="model_not_found")
        job: dict[str, Any] = {"request_id": rid, "sampling": P.sampling_fields(req), "stream": bool(req.stream)}
        if kind == "chat":
            job["messages"] = P.check_chat(req)
            job["max_tokens"] = req.max_completion_tokens or req.max_tokens
            job["max_tokens_param"] = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        else:
            job["prompt"] = P.check_completion(req)
            job["max_tokens"] = req.max_tokens
            job["max_tokens_param"] = "max_tokens"
        user = resolve_user(req.user, request.headers.get(USER_HEADER), identity, self.trust_user_field)
        log.info("request %s from user %s", rid, log_tag(user))
        return req, job, user

    @staticmethod
    def _parse(schema, body: bytes):
        try:
            return schema.model_validate_json(body)
        except ValidationError as e:
            err = e.errors()[0]
            if err["type"] == "json_invalid":
                raise ApiError(400, f"Request body is not valid JSON ({err['msg']}).", code="invalid_json")
            if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
                raise ApiError(400, "Request body must be a JSON object.", code="invalid_json")
            raise from_validation_error(e, P.known_fields(schema)) from None

    @staticmethod
    async def _first(items, rid: str) -> dict:
        """The model's first item: either an ApiError (before any token) or the start of the answer."""
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            log.error("request %s: the model answered nothing", rid)
            raise internal_error(rid) from None
        if "error" in first:
            raise ApiError.from_dict(first["error"])
        return first

    async def _whole(self, req, kind: str, rid: str, first: dict, items) -> Any:
        from fastapi.responses import JSONResponse

        done = first
        async for item in items:  # a non-streamed job sends one item, but tolerate more
            done = item
        if done.get("failed"):
            log.error("request %s failed in the engine", rid)
            raise internal_error(rid)
        build = P.chat_response if kind == "chat" else P.completion_response
        return JSONResponse(build(rid, req.model, int(time.time()), done["text"],
                                  P.openai_finish_reason(done["finish_reason"]), done["prompt_tokens"],
                                  done["completion_tokens"]))

    def _stream(self, req, kind: str, rid: str, first: dict, items):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(self._sse(req, kind, rid, first, items), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    async def _sse(self, req, kind: str, rid: str, first: dict, items):
        """SSE events: role chunk (chat), text chunks, a finish chunk, the usage chunk if asked, [DONE]."""
        model, created = req.model, int(time.time())
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        pt, ct = first["prompt_tokens"], 0

        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

        def chunk(text: str, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
                return P.chat_chunk(rid, model, created, delta, finish, with_usage)
            return P.completion_chunk(rid, model, created, text, finish, with_usage)

        try:
            if kind == "chat":
                yield event(chunk("", None, role=True))
            item = first
            while True:
                ct = item.get("completion_tokens", ct)
                if item.get("failed"):
                    log.error("request %s failed in the engine mid-stream", rid)
                    yield event(internal_error(rid).body())
                    break
                finish = item.get("finish_reason")
                if item.get("text") or finish:
                    yield event(chunk(item.get("text", ""), P.openai_finish_reason(finish) if finish else None))
                if finish:
                    break
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    break
            if with_usage:
                obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                yield event(P.usage_chunk(rid, model, created, obj, pt, ct))
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away cancels this generator; closing `items` cancels the model's side,
            # which aborts the sequence and frees its cache slot.
            await _aclose(items)


async def _aclose(items) -> None:
    close = getattr(items, "aclose", None) or getattr(items, "cancel", None)
    if close is None:
        return
    out = close()
    if hasattr(out, "__await__"):
        await out

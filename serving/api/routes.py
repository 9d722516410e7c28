"""What each endpoint does, independent of Ray Serve: parse and check the request, call the model, shape the answer.

`OpenAIServer` is given a `generate` callable (request job dict -> async iterator of plain dict items, see
serving/app.py's `ModelServer.generate`) and a `metrics` callable, so the ingress deployment is a thin shell.
Every path returns OpenAI-shaped JSON, and every failure an `ApiError`: bad input never reaches the model as an
exception, and an unexpected failure is a 500 that names only a request id.
"""
from __future__ import annotations

import asyncio
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
             " <code>GET /v1/models</code>, <code>POST /tokenize</code>, <code>POST /detokenize</code>,"
             " <code>GET /health</code>, <code>GET /metrics</code>; the schema: <code>GET /openapi.json</code>.</p>"
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


async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 before reading when Content-Length is over `limit`, and read no further
    than `limit` when it has none (chunked) or lies."""
    announced = request.headers.get("content-length")
    if announced is not None:
        if not announced.strip().isdigit():
            raise ApiError(400, "The Content-Length header is not a byte count.", code="invalid_request")
        if int(announced) > limit:
            raise ApiError(413, f"Request body is {int(announced)} bytes; the limit is {limit}.",
                           code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body is over the limit of {limit} bytes.", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class OpenAIServer:
    """The endpoints' logic for one served model."""

    # (kind, job) -> the model replica's answer to a tokenizer job (/tokenize, /detokenize); set by the ingress.
    call_model: Callable[[str, dict], Awaitable[dict]] | None = None
    _openapi: dict | None = None
    prefix_cache_per_api_key = False  # set by the ingress (Serve arg): the key's identity salts every request

    def __init__(self, model_name: str, max_model_len: int, generate: Generate,
                 metrics: Callable[[], Awaitable[bytes]], keys: KeyChecker, recorder: Recorder,
                 is_backpressure: Callable[[BaseException], bool] = lambda e: False, retry_after_s: int = 1,
                 product: str = "llm-api", trust_user_field: bool | None = None, metrics_require_key: bool = False):
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.generate = generate
        self.metrics_text = metrics
        self.keys = keys
        self.recorder = recorder
        self.is_backpressure = is_backpressure
        self.retry_after_s = retry_after_s
        self.product = product
        self.metrics_require_key = metrics_require_key  # /metrics answers only with a valid key (when keys are set)
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

        if self.metrics_require_key:
            try:
                self.keys.identity(request.headers.get("authorization"))
            except ApiError as e:
                return error_response(e)
        return Response(await self.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi(self):
        from fastapi.responses import JSONResponse

        from serving.api.openapi import openapi_document

        if self._openapi is None:
            self._openapi = openapi_document()
        return JSONResponse(self._openapi)

    # ---- tokenizer endpoints (vLLM's /tokenize and /detokenize) -------------------------------------------------
    async def tokenize(self, request):
        return await self._tokenizer_call(request, "tokenize")

    async def detokenize(self, request):
        return await self._tokenizer_call(request, "detokenize")

    async def _tokenizer_call(self, request, kind: str):
        from fastapi.responses import JSONResponse

        from serving.api.openapi import DetokenizeRequest, TokenizeRequest

        try:
            self.keys.identity(request.headers.get("authorization"))
            body = await read_body(request)
            schema = TokenizeRequest if kind == "tokenize" else DetokenizeRequest
            req = self._parse(schema, body)
            if req.model is not None and req.model != self.model_name:
                raise ApiError(404, f"The model '{req.model[:100]}' does not exist; this server serves "
                                    f"'{self.model_name}'.", param="model", code="model_not_found")
            job: dict[str, Any] = {"kind": kind}
            if kind == "detokenize":
                job["tokens"] = req.tokens
            elif (req.prompt is None) == (req.messages is None):
                raise P.bad_request("Give exactly one of 'prompt' or 'messages'.", param="prompt",
                                    code="invalid_value")
            elif req.prompt is not None:
                job.update(prompt=req.prompt, add_special_tokens=req.add_special_tokens)
            else:
                fake = P.ChatCompletionRequest(model=self.model_name, messages=req.messages, tools=req.tools)
                checked = P.check_chat(fake)
                job.update(messages=checked["messages"], tools=checked["tools"])
            out = await self.call_model("tokenize", job)
            if "error" in out:
                raise ApiError.from_dict(out["error"])
            return JSONResponse(out)
        except ApiError as e:
            return error_response(e)
        except Exception:
            rid = f"tok-{uuid.uuid4().hex}"
            log.exception("request %s (%s) failed", rid, kind)
            return error_response(internal_error(rid))

    # ---- generation --------------------------------------------------------------------------------------------
    async def chat(self, request):
        return await self._handle(request, "chat")

    async def completions(self, request):
        return await self._handle(request, "completion")

    async def _handle(self, request, kind: str):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        streams: list = []
        try:
            req, jobs, user = await self._accept(request, kind, rid)
            streams = [self.generate(job) for job in jobs]
            # Every prompt's request starts at once; a refusal of any (400/503) refuses the whole request.
            firsts = await asyncio.gather(*[self._first(items, rid) for items in streams])
            record_safely(self.recorder, user, self.product)  # the model accepted it: now it counts
            if req.stream:
                return self._stream(req, kind, rid, firsts, streams)
            return await self._whole(req, kind, rid, firsts, streams)
        except ApiError as e:
            await _aclose_all(streams)
            return error_response(e)
        except Exception as e:
            await _aclose_all(streams)
            if self.is_backpressure(e):
                return error_response(queue_full(self.retry_after_s))
            log.exception("request %s failed", rid)
            return error_response(internal_error(rid))

    async def _accept(self, request, kind: str, rid: str):
        """Auth, body, fields, model name, user: everything checked before the model sees the request.
        Returns the request and one job per prompt (chat: one)."""
        identity = self.keys.identity(request.headers.get("authorization"))
        body = await read_body(request)
        schema = P.ChatCompletionRequest if kind == "chat" else P.CompletionRequest
        req = self._parse(schema, body)
        if req.model != self.model_name:
            raise ApiError(404, f"The model '{req.model[:100]}' does not exist; this server serves "
                                f"'{self.model_name}' (see GET /v1/models).", param="model", code="model_not_found")
        job: dict[str, Any] = {"request_id": rid, "sampling": P.sampling_fields(req), "stream": bool(req.stream)}
        if req.cache_salt or (self.prefix_cache_per_api_key and identity):
            # Only requests with the same salt share cached prompt blocks (serving/engine/kv_cache.py).
            tenant = f"key:{identity}\n" if self.prefix_cache_per_api_key and identity else ""
            job["cache_salt"] = tenant + (req.cache_salt or "")
        if kind == "chat":
            job.update(P.check_chat(req))
            job["max_tokens"] = req.max_completion_tokens or req.max_tokens
            job["max_tokens_param"] = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            jobs = [job]
        else:
            prompts = P.check_completion(req)
            job["max_tokens"] = req.max_tokens
            job["max_tokens_param"] = "max_tokens"
            job["echo"] = bool(req.echo)
            jobs = [dict(job, prompt=p, request_id=rid if len(prompts) == 1 else f"{rid}-{i}")
                    for i, p in enumerate(prompts)]
        user = resolve_user(req.user, request.headers.get(USER_HEADER), identity, self.trust_user_field)
        log.info("request %s from user %s", rid, log_tag(user))
        return req, jobs, user

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

    async def _whole(self, req, kind: str, rid: str, firsts: list[dict], streams: list) -> Any:
        from fastapi.responses import JSONResponse

        n = req.n or 1
        by_choice: dict[int, list[dict]] = {}  # choice index (prompt i's sample j is i * n + j) -> its items
        pt, ct = 0, 0
        for s, (first, items) in enumerate(zip(firsts, streams)):
            pt += first["prompt_tokens"]  # once per prompt, however many samples
            parts = [first]
            async for item in items:  # one item per sample, but tolerate more
                parts.append(item)
            for p in parts:
                by_choice.setdefault(s * n + p.get("index", 0), []).append(p)
        choices = []
        for index in sorted(by_choice):
            parts = by_choice[index]
            head, done = parts[0], parts[-1]
            if done.get("failed"):
                log.error("request %s failed in the engine", rid)
                raise internal_error(rid)
            text = "".join(p.get("text", "") for p in parts)
            finish = P.openai_finish_reason(done["finish_reason"])
            lps = [pos for p in parts for pos in p.get("logprobs", ())]
            ct += done["completion_tokens"]
            if kind == "chat":
                calls = done.get("tool_calls")
                logprobs = P.chat_logprobs(lps) if "logprobs" in head else None
                choices.append(P.chat_choice(index, None if calls and not text else text, calls, logprobs, finish))
            else:
                prefix = head.get("prompt_text", "")
                logprobs = None
                if "logprobs" in head:
                    logprobs = P.completion_logprobs((head.get("prompt_logprobs") or []) + lps)
                choices.append(P.completion_choice(index, prefix + text, logprobs, finish))
        build = P.chat_response if kind == "chat" else P.completion_response
        return JSONResponse(build(rid, req.model, int(time.time()), choices, pt, ct))

    def _stream(self, req, kind: str, rid: str, firsts: list[dict], streams: list):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(self._sse(req, kind, rid, firsts, streams), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    async def _sse(self, req, kind: str, rid: str, firsts: list[dict], streams: list):
        """SSE events: role chunk (chat), text chunks, a finish chunk per choice, the usage chunk if asked, [DONE].
        With several prompts or samples (n) their chunks interleave, each with its choice `index` (prompt i's
        sample j is choice i * n + j)."""
        model, created = req.model, int(time.time())
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        n = req.n or 1
        pt = sum(f["prompt_tokens"] for f in firsts)  # once per prompt, however many samples
        cts = [0] * (len(streams) * n)
        offsets = [0] * (len(streams) * n)  # completions text_offset so far, per choice

        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

        def chunks(index: int, item: dict) -> list[dict]:
            finish = item.get("finish_reason")
            finish = P.openai_finish_reason(finish) if finish else None
            text, lps = item.get("text", ""), item.get("logprobs")
            if kind == "chat":
                out = []
                logprobs = P.chat_logprobs(lps) if lps else None
                calls = item.get("tool_calls") or ()
                if text or logprobs or (finish and not calls):
                    out.append(P.chat_chunk(rid, model, created, {"content": text} if text else {},
                                            None if calls else finish, with_usage, logprobs, index))
                for k, call in enumerate(calls):
                    fn = call["function"]
                    head = {"index": k, "id": call["id"], "type": "function",
                            "function": {"name": fn["name"], "arguments": ""}}
                    out.append(P.chat_chunk(rid, model, created, {"tool_calls": [head]}, None, with_usage, None,
                                            index))
                    out.append(P.chat_chunk(rid, model, created, {"tool_calls": [
                        {"index": k, "function": {"arguments": fn["arguments"]}}]}, None, with_usage, None, index))
                if finish and calls:
                    out.append(P.chat_chunk(rid, model, created, {}, finish, with_usage, None, index))
                return out
            prefix = item.get("prompt_text", "")
            logprobs = None
            if lps is not None:
                logprobs = P.completion_logprobs((item.get("prompt_logprobs") or []) + lps, offsets[index])
                offsets[index] += sum(len(t) for t in logprobs["tokens"])
            if prefix or text or finish or lps:
                return [P.completion_chunk(rid, model, created, prefix + text, finish, with_usage, logprobs, index)]
            return []

        try:
            if kind == "chat":
                for index in range(len(streams) * n):
                    yield event(P.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None,
                                             with_usage, None, index))
            async for s, item in _merge(firsts, streams):
                index = s * n + item.get("index", 0)
                cts[index] = item.get("completion_tokens", cts[index])
                if item.get("failed"):
                    log.error("request %s failed in the engine mid-stream", rid)
                    yield event(internal_error(rid).body())
                    break
                for c in chunks(index, item):
                    yield event(c)
            if with_usage:
                obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                yield event(P.usage_chunk(rid, model, created, obj, pt, sum(cts)))
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away cancels this generator; closing the streams cancels the model's side,
            # which aborts the sequences and frees their cache slots.
            await _aclose_all(streams)


def _ends(item: dict) -> bool:
    """The stream's final item (all its samples done), or a failure."""
    return bool(item.get("last") or item.get("failed"))


async def _merge(firsts: list[dict], streams: list):
    """(stream, item) from every stream until each has finished, in arrival order (one stream: in place)."""
    if len(streams) == 1:
        item = firsts[0]
        while True:
            yield 0, item
            if _ends(item):
                return
            try:
                item = await streams[0].__anext__()
            except StopAsyncIteration:
                return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        item = firsts[index]
        try:
            while True:
                await queue.put((index, item))
                if _ends(item):
                    break
                item = await streams[index].__anext__()
        except StopAsyncIteration:
            pass
        except Exception as e:  # surfaces in the consumer
            await queue.put((index, e))
            return
        await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        live = len(streams)
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield index, item
    finally:
        for t in tasks:
            t.cancel()


async def _aclose_all(streams: list) -> None:
    for items in streams:
        await _aclose(items)


async def _aclose(items) -> None:
    close = getattr(items, "aclose", None) or getattr(items, "cancel", None)
    if close is None:
        return
    out = close()
    if hasattr(out, "__await__"):
        await out

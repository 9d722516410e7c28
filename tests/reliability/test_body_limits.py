"""Request size is bounded before it costs anything (issue 16, item 6).

A body whose Content-Length is over the limit is refused before it is read; a body without one (chunked) is read
only up to the limit; a prompt longer in characters than the context could ever hold is refused before it is
tokenized, and tokenizing runs off the model replica's event loop. The HTTP layer is the real OpenAIServer under
FastAPI over ASGI, fed by a client body that counts what the server pulled.
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation of the route.
import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request

MIB = 1024 * 1024
CHUNK = 64 * 1024


class CountingBody(httpx.AsyncByteStream):
    """A 20 MiB JSON-ish body sent in 64 KiB chunks; counts the bytes the server asked for."""

    def __init__(self, total: int = 20 * MIB):
        self.total, self.sent = total, 0

    async def __aiter__(self):
        while self.sent < self.total:
            self.sent += CHUNK
            yield b" " * CHUNK


def _app():
    from serving.api.auth import KeyChecker
    from serving.api.routes import OpenAIServer

    async def model(job):
        yield {"text": "ok", "completion_tokens": 1, "finish_reason": "length", "failed": False, "prompt_tokens": 1}

    async def metrics() -> bytes:
        return b""

    class Rec:
        def record(self, *a):
            pass

    server = OpenAIServer("m", 64, model, metrics, KeyChecker({}), Rec())
    web = FastAPI()

    @web.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    return web


def _send(headers: dict) -> tuple[int, dict, int]:
    body = CountingBody()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://t") as c:
            r = await c.post("/v1/completions", content=body, headers={"Content-Type": "application/json", **headers})
            return r.status_code, r.json()

    status, payload = asyncio.run(go())
    return status, payload, body.sent


def test_an_announced_huge_body_is_refused_before_reading():
    status, payload, sent = _send({"Content-Length": str(20 * MIB)})
    assert status == 413 and payload["error"]["code"] == "body_too_large", payload
    assert sent <= CHUNK, f"the server read {sent} bytes of a body it had to refuse"


def test_a_chunked_huge_body_is_read_only_up_to_the_limit():
    status, payload, sent = _send({})
    assert status == 413 and payload["error"]["code"] == "body_too_large", payload
    assert sent <= 8 * MIB + 2 * CHUNK, f"the server read {sent} bytes"


def test_a_prompt_longer_than_any_context_is_refused_before_tokenizing():
    from types import SimpleNamespace

    from serving.api.errors import ApiError
    from serving.api.model_server import ModelServer

    cls = ModelServer.func_or_class

    class Tokenizer:  # counts calls: the check must come before any
        calls = 0

        def encode(self, text):
            Tokenizer.calls += 1
            return [1] * len(text)

    replica = SimpleNamespace(max_model_len=96, vocab_size=1000, llm=SimpleNamespace(tokenizer=Tokenizer()))
    with pytest.raises(ApiError) as err:
        asyncio.run(cls._tokenize(replica, {"prompt": "x" * 1_000_000}))
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    assert Tokenizer.calls == 0

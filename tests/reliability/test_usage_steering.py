"""The licence's user count cannot be steered by callers (issue 16, item 12).

A request is recorded only once the model accepted it (not when it is refused: bad body, unknown model, context
too long, queue full). Whether the body's `user` field and the `X-User-Id` header name the user is the operator's
choice, `trust_user_field`: on by default without a keys file, off with one (then the key's identity counts), and
when on with keys, the named user is namespaced by the key's identity so one key cannot count as another's users.
The HTTP layer here is the real OpenAIServer under FastAPI over ASGI; the model side is the replica's protocol
(a refusal item, or answer items), and the recorder keeps what it is given.
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation of the route.
import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request

KEY = "sk-reliability-team-a-0123456789"


class ListRecorder:
    def __init__(self):
        self.users: list[str] = []

    def record(self, user_id: str, product: str, timestamp: float) -> None:
        self.users.append(user_id)


async def _model(job: dict):
    from serving.api.errors import bad_request

    if job.get("prompt") == "too long":  # what the replica answers for a prompt past the context
        yield {"error": bad_request("prompt too long", param="prompt", code="context_length_exceeded").to_dict()}
        return
    yield {"text": "ok", "completion_tokens": 1, "finish_reason": "length", "failed": False, "prompt_tokens": 2}


def _client(keys: bool, **server_kwargs):
    from serving.api.auth import KeyChecker, digest
    from serving.api.routes import OpenAIServer

    async def metrics() -> bytes:
        return b""

    recorder = ListRecorder()
    server = OpenAIServer("m", 64, _model, metrics, KeyChecker({digest(KEY): "team-a"} if keys else {}), recorder,
                          **server_kwargs)
    web = FastAPI()

    @web.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://test"), recorder


def _post(client, body: dict, headers: dict) -> int:
    async def go():
        async with client:
            return (await client.post("/v1/completions", json=body, headers=headers)).status_code
    return asyncio.run(go())


AUTH = {"Authorization": f"Bearer {KEY}"}
OK = {"model": "m", "prompt": "hi", "max_tokens": 1, "user": "mallory"}


@pytest.mark.parametrize("body", [{"model": "m", "prompt": "too long", "user": "u1"},  # the model refuses
                                  {"model": "other", "prompt": "hi", "user": "u1"},     # unknown model
                                  {"model": "m", "prompt": "hi", "temperature": -1, "user": "u1"}])  # bad field
def test_a_refused_request_is_not_counted(body):
    client, rec = _client(keys=False)
    assert _post(client, body, {}) in (400, 404)
    assert rec.users == []


def test_with_a_keys_file_the_key_identity_counts_not_the_body():
    client, rec = _client(keys=True)
    assert _post(client, OK, {**AUTH, "X-User-Id": "someone-else"}) == 200
    assert rec.users == ["team-a"]


def test_trusted_user_fields_are_namespaced_by_the_key():
    client, rec = _client(keys=True, trust_user_field=True)
    assert _post(client, OK, AUTH) == 200
    assert rec.users == ["team-a/mallory"]


def test_without_keys_the_user_field_counts():
    client, rec = _client(keys=False)
    assert _post(client, OK, {}) == 200
    assert rec.users == ["mallory"]

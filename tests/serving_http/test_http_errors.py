"""Hostile and malformed requests against a real Serve app: each gets the right 4xx in OpenAI's error shape,
naming the field, and the server keeps serving. API-key auth. A full queue answers 503 with Retry-After, promptly.

The app is deliberately small (one running sequence, one waiting) so that a burst overflows it, and gathers
streamed tokens into chunks of 0.2 s (stream_interval_s), which must not change the text.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from serving_http_helpers import API_KEY, delete_app, deploy_app

pytestmark = pytest.mark.slow
APP = "http-errors"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": "scout-tiny", "messages": USER, **fields}


def comp(**fields):
    return {"model": "scout-tiny", "prompt": "hello", **fields}


# (name, path, body (dict, or raw bytes), headers override or None, status, param, code)
CASES = [
    ("bad json", CHAT, b"{not json", None, 400, None, "invalid_json"),
    ("empty body", CHAT, b"", None, 400, None, "invalid_json"),
    ("json array", CHAT, b"[]", None, 400, None, "invalid_json"),
    ("json string", CHAT, b'"hello"', None, 400, None, "invalid_json"),
    ("truncated json", CHAT, b'{"model": "scout-tiny", "messages": [', None, 400, None, "invalid_json"),
    ("missing model", CHAT, {"messages": USER}, None, 400, "model", "missing_field"),
    ("model null", CHAT, chat(model=None), None, 400, "model", "invalid_value"),
    ("missing messages", CHAT, {"model": "scout-tiny"}, None, 400, "messages", "missing_field"),
    ("empty messages", CHAT, chat(messages=[]), None, 400, "messages", "invalid_value"),
    ("messages not a list", CHAT, chat(messages="hi"), None, 400, "messages", "invalid_value"),
    ("message without role", CHAT, chat(messages=[{"content": "hi"}]), None, 400, "messages[0].role",
     "missing_field"),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), None, 400, "messages[0].role",
     "invalid_value"),
    ("tool role", CHAT, chat(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]), None,
     400, "messages[1].role", "invalid_value"),
    ("content int", CHAT, chat(messages=[{"role": "user", "content": 5}]), None, 400, "messages[0].content",
     "invalid_value"),
    ("user without content", CHAT, chat(messages=[{"role": "user"}]), None, 400, "messages[0].content",
     "missing_field"),
    ("image part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), None, 400,
     "messages[0].content[0]", "invalid_image"),  # undecodable (3 bytes)
    ("image after text", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
     None, 400, "messages[0].content[1]", "invalid_image"),  # http(s) image URLs are off by default
    ("audio part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), None, 400,
     "messages[0].content[0]", "invalid_value"),
    ("temperature string", CHAT, chat(temperature="hot"), None, 400, "temperature", "invalid_value"),
    ("temperature too high", CHAT, chat(temperature=5), None, 400, "temperature", "invalid_value"),
    ("temperature negative", CHAT, chat(temperature=-1), None, 400, "temperature", "invalid_value"),
    ("top_p zero", CHAT, chat(top_p=0), None, 400, "top_p", "invalid_value"),
    ("top_p above one", CHAT, chat(top_p=1.5), None, 400, "top_p", "invalid_value"),
    ("max_tokens string", CHAT, chat(max_tokens="10"), None, 400, "max_tokens", "invalid_value"),
    ("max_tokens zero", CHAT, chat(max_tokens=0), None, 400, "max_tokens", "invalid_value"),
    ("max_tokens negative", CHAT, chat(max_tokens=-5), None, 400, "max_tokens", "invalid_value"),
    ("max_tokens float", CHAT, chat(max_tokens=1.5), None, 400, "max_tokens", "invalid_value"),
    ("max_tokens huge", CHAT, chat(max_tokens=10 ** 9), None, 400, "max_tokens", "context_length_exceeded"),
    ("max_completion_tokens huge", CHAT, chat(max_completion_tokens=2 ** 31), None, 400, "max_completion_tokens",
     "context_length_exceeded"),
    ("max_tokens bool", CHAT, chat(max_tokens=True), None, 400, "max_tokens", "invalid_value"),
    ("n=129", CHAT, chat(n=129), None, 400, "n", "invalid_value"),
    ("n=0", CHAT, chat(n=0), None, 400, "n", "invalid_value"),
    ("stream not bool", CHAT, chat(stream="yes"), None, 400, "stream", "invalid_value"),
    ("five stop sequences", CHAT, chat(stop=["a", "b", "c", "d", "e"]), None, 400, "stop", "invalid_value"),
    ("stop number", CHAT, chat(stop=123), None, 400, "stop", "invalid_value"),
    ("seed string", CHAT, chat(seed="abc"), None, 400, "seed", "invalid_value"),
    ("seed too large", CHAT, chat(seed=2 ** 70), None, 400, "seed", "invalid_value"),
    ("unknown model", CHAT, chat(model="gpt-4o"), None, 404, "model", "model_not_found"),
    ("misspelt field", CHAT, chat(temprature=0.5), None, 400, "temprature", "unknown_field"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=3), None, 400, "top_logprobs", "invalid_value"),
    ("tool name with a space", CHAT, chat(tools=[{"type": "function", "function": {"name": "f g"}}]), None, 400,
     "tools[0].function.name", "invalid_value"),
    ("presence_penalty too high", CHAT, chat(presence_penalty=3.0), None, 400, "presence_penalty", "invalid_value"),
    ("logit_bias key not an id", CHAT, chat(logit_bias={"abc": 5.0}), None, 400, "logit_bias", "invalid_value"),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), None, 400,
     "stream_options", "invalid_value"),
    ("unenforceable json schema", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}), None, 400,
     "response_format.json_schema.schema", "unsupported_schema"),
    ("user too long", CHAT, chat(user="u" * 1000), None, 400, "user", "invalid_value"),
    ("prompt longer than context", CHAT, chat(messages=[{"role": "user", "content": "llama " * 400}]), None, 400,
     "messages", "context_length_exceeded"),
    ("no key", CHAT, chat(), {}, 401, None, "missing_api_key"),
    ("wrong key", CHAT, chat(), {"Authorization": "Bearer sk-wrong-key-0000000000000000"}, 401, None,
     "invalid_api_key"),
    ("not bearer", CHAT, chat(), {"Authorization": f"Token {API_KEY}"}, 401, None, "invalid_api_key"),
    ("completion missing prompt", COMP, {"model": "scout-tiny"}, None, 400, "prompt", "missing_field"),
    ("completion second prompt empty", COMP, comp(prompt=["a", ""]), None, 400, "prompt[1]", "invalid_value"),
    ("completion token out of vocab", COMP, comp(prompt=[1, 10 ** 9]), None, 400, "prompt", "invalid_value"),
    ("completion prompt too long", COMP, comp(prompt=[100] * 200), None, 400, "prompt", "context_length_exceeded"),
    ("completion max_tokens past context", COMP, comp(max_tokens=95), None, 400, "max_tokens",
     "context_length_exceeded"),
    ("completion logprobs above 5", COMP, comp(logprobs=6), None, 400, "logprobs", "invalid_value"),
    ("completion best_of", COMP, comp(best_of=3), None, 400, "best_of", "unsupported_value"),
    ("completion empty prompt", COMP, comp(prompt=""), None, 400, "prompt", "invalid_value"),
    ("completion n float", COMP, comp(n=2.0), None, 400, "n", "invalid_value"),
    ("completion unknown model", COMP, comp(model="llama-9000"), None, 404, "model", "model_not_found"),
]


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, keys_file):
    base = deploy_app(APP, serve_port, model=str(scout_tiny), api_keys_file=str(keys_file), max_num_seqs=1,
                      max_waiting_requests=1, retry_after_s=2, stream_interval_s=0.2)
    yield base
    delete_app(APP)


def test_fifty_hostile_requests_get_4xx_and_the_server_stays_up(server):
    assert len(CASES) >= 50
    failures = []
    with httpx.Client(base_url=server, timeout=60) as c:
        for name, path, body, headers, status, param, code in CASES:
            h = dict(AUTH) if headers is None else headers
            if isinstance(body, bytes):
                r = c.post(path, content=body, headers={**h, "Content-Type": "application/json"})
            else:
                r = c.post(path, json=body, headers=h)
            try:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
                got = (r.status_code, err["param"], err["code"])
                if got != (status, param, code):
                    failures.append(f"{name}: got {got}, want {(status, param, code)}: {err['message']}")
                elif param and param.split("[")[0].split(".")[0] not in err["message"]:
                    failures.append(f"{name}: message does not name {param}: {err['message']}")
            except Exception as e:
                failures.append(f"{name}: status {r.status_code}, body {r.text[:200]!r} ({e})")
        assert not failures, "\n".join(failures)
        ok = c.post(CHAT, json=chat(max_tokens=3, temperature=0), headers=AUTH)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_other_4xx_shapes(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get(CHAT)
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        r = c.post(CHAT, content=b"x" * (9 * 1024 * 1024), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_openai_client_sees_typed_errors(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="scout-tiny", messages=USER, n=200)
    assert e.value.body["param"] == "n"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-not-a-key-00000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="scout-tiny", messages=USER)
    second_key = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-test-alice-abcdef0123456789", max_retries=0)
    assert second_key.chat.completions.create(model="scout-tiny", messages=USER, max_tokens=2).choices


async def _one(client: httpx.AsyncClient, i: int):
    body = {"model": "scout-tiny", "prompt": f"Story {i}:", "max_tokens": 60, "ignore_eos": True,
            "temperature": 1.0, "seed": i, "stream": True}
    t0 = time.time()
    async with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, dict(r.headers), r.json(), time.time() - t0
        lines = [line async for line in r.aiter_lines() if line]
        return r.status_code, dict(r.headers), lines, time.time() - t0


def test_full_queue_gets_503_with_retry_after(server):
    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            return await asyncio.gather(*[_one(c, i) for i in range(10)])

    results = asyncio.run(run())
    codes = sorted(code for code, *_ in results)
    refused = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    assert refused, f"no 503 among {codes}"
    assert len(served) >= 2, codes
    assert set(codes) <= {200, 503}, codes
    for _, headers, body, seconds in refused:
        assert headers["retry-after"] == "2"
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "service_unavailable_error"
        assert seconds < 10  # refused at once, not after waiting for a slot
    for _, _, lines, _ in served:
        assert lines[-1] == "data: [DONE]"

    # Once the burst is over the server serves again.
    r = httpx.post(f"{server}/v1/completions", timeout=60,
                   json={"model": "scout-tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}, headers=AUTH)
    assert r.status_code == 200, r.text


def test_stream_interval_gathers_tokens_without_changing_the_text(server, reference_engine):
    from serving.engine import SamplingParams

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    chunks = list(client.completions.create(model="scout-tiny", prompt="The herd", max_tokens=24, temperature=0.7,
                                            seed=3, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    ref = reference_engine.generate("The herd", SamplingParams(max_tokens=24, temperature=0.7, seed=3,
                                                               ignore_eos=True))[0]
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 24
    assert len(texts) < 24  # tokens travelled together

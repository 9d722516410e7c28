"""OpenAI API additions through a real Serve app, with the official `openai` client and httpx: log-probabilities
(equal to transformers' log_softmax within 1e-4, fp32), completions echo and lists of prompts, tool calls (round
trip, streamed == whole, forced by tool_choice), structured output (`chat.completions.parse`, a bounded JSON schema
over 20 seeds), logit_bias, /openapi.json, /tokenize and /detokenize.

One app (one replica, no expert parallelism) for the whole module; the checkpoint has random weights, so forced
calls and schemas are what make the answers parseable.
"""
from __future__ import annotations

import asyncio
import json
from enum import Enum

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from serving_http_helpers import API_KEY, delete_app, deploy_app

pytestmark = pytest.mark.slow
APP = "http-api-additions"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "scout-tiny"
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a time zone.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["CET", "UTC"]}},
                       "required": ["tz"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, keys_file):
    base = deploy_app(APP, serve_port, model=str(scout_tiny), api_keys_file=str(keys_file), max_num_seqs=8,
                      max_model_len=1024)
    yield base
    delete_app(APP)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def logp(scout_tiny):
    """ids -> transformers' fp32 log_softmax [T, V] on the same checkpoint."""
    from transformers import AutoTokenizer, Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(scout_tiny, dtype=torch.float32).eval().language_model
    tok = AutoTokenizer.from_pretrained(str(scout_tiny))

    def run(ids):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    run.tokenizer = tok
    return run


# ---- log-probabilities ----------------------------------------------------------------------------------------

def test_chat_top_logprobs_equal_transformers_streamed_too(client, logp):
    kw = dict(model=MODEL, messages=ASK, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=3)
    resp = client.chat.completions.create(**kw)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    tok = logp.tokenizer
    ids = tok.encode(tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)
    for c in content:  # greedy: follow transformers' argmax and compare each position
        row = logp(ids)[-1]
        top = torch.topk(row, 3)
        assert c.logprob == pytest.approx(top.values[0].item(), abs=1e-4)
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t.token for t in c.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
        assert c.token == tok.decode([top.indices[0].item()]) and c.bytes == list(c.token.encode())
        ids.append(top.indices[0].item())
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [c for ch in chunks for c in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])]
    # same tokens; values within fp32 noise (the repeat may reuse the first request's cached prefix)
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)


def test_completion_echo_logprobs_equal_transformers(client, logp):
    prompt = [5, 300, 77, 1200, 42, 9, 640]
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0.0, echo=True,
                                     logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    tok = logp.tokenizer
    assert resp.choices[0].text.startswith(tok.decode(prompt))
    ref = logp(prompt)
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        top = torch.topk(ref[i - 1], 2)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert lp.top_logprobs[i][tok.decode([t])] == pytest.approx(v, abs=1e-4)
    assert lp.text_offset[1] == len(lp.tokens[0])
    # the completion's own tokens: the greedy ones after the prompt
    assert lp.token_logprobs[len(prompt)] == pytest.approx(ref[-1].max().item(), abs=1e-4)
    # streamed: same tokens and values
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0.0, echo=True,
                                            logprobs=2, stream=True))
    toks = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert toks == lp.tokens
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == resp.choices[0].text


def test_completion_list_of_prompts_one_choice_each(client):
    prompts = ["Once upon a time", "The llama walked", "A herd"]
    resp = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0.0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for p, c in zip(prompts, resp.choices):
        alone = client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0.0)
        assert c.text == alone.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0.0,
                                            stream=True))
    for i, c in enumerate(resp.choices):
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i) == c.text


def test_logit_bias_forces_a_token(client, logp):
    tok_id = logp.tokenizer.encode(" llama", add_special_tokens=False)[0]
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0.0,
                                     logit_bias={str(tok_id): 100}, frequency_penalty=0.5)
    assert resp.choices[0].text == logp.tokenizer.decode([tok_id] * 4)


# ---- tools ----------------------------------------------------------------------------------------------------

def _stream_calls(chunks):
    content, calls, finish = "", {}, None
    for ch in chunks:
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or ():
            c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_call_round_trip_streamed_equals_whole(client, choice):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=1.0, seed=3)
    resp = client.chat.completions.create(**kw)
    msg, finish = resp.choices[0].message, resp.choices[0].finish_reason
    assert finish == "tool_calls" and msg.tool_calls, msg
    names = {t["function"]["name"] for t in TOOLS}
    for call in msg.tool_calls:
        assert call.function.name in names and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        schema = next(t for t in TOOLS if t["function"]["name"] == call.function.name)["function"]["parameters"]
        jsonschema.validate(args, schema)
    if isinstance(choice, dict):
        assert [c.function.name for c in msg.tool_calls] == ["get_time"]
    content, calls, sfinish = _stream_calls(client.chat.completions.create(stream=True, **kw))
    assert sfinish == "tool_calls" and content == (msg.content or "")
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls]
    # the round trip: the calls and their results go back; the answer is a plain message
    results = [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"ok": True, "n": i})}
               for i, c in enumerate(msg.tool_calls)]
    follow = ASK + [msg.model_dump(exclude_none=True)] + results[::-1]  # results out of order: matched by id
    final = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, temperature=0.0)
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    streamed = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, tool_choice="none",
                                              max_tokens=8, temperature=0.0, stream=True)
    assert _stream_calls(streamed)[0] == final.choices[0].message.content


def test_tool_messages_render_through_the_released_template(server, logp):
    """What the replica renders: arguments as a dict (once-encoded JSON), results in call order, tools listed."""
    from serving.api import protocol as P

    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "b", "content": '{"time": "10:00"}'},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"}]
    req = P.ChatCompletionRequest.model_validate({"model": MODEL, "messages": msgs, "tools": TOOLS})
    job = P.check_chat(req)
    text = logp.tokenizer.apply_chat_template(job["messages"], tools=job["tools"], add_generation_prompt=True,
                                              tokenize=False)
    assert '{"name": "get_weather", "parameters": {"city": "Zürich"}}' in text  # once-encoded
    assert text.index('"sunny"') < text.index('{"time": "10:00"}')  # a's result first, as a was called first
    assert '"name": "get_time"' in text.split("<|header_start|>assistant")[0]  # tools in the first user turn


# ---- structured output ----------------------------------------------------------------------------------------

class Unit(str, Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Forecast(BaseModel):
    city: str = Field(max_length=10)
    unit: Unit
    days: int = Field(ge=1, le=7)
    rain: bool


def test_chat_completions_parse_with_pydantic(client):
    resp = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast, max_tokens=80,
                                         temperature=0.7, seed=1)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Forecast) and 1 <= choice.message.parsed.days <= 7


BOUNDED = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "score": {"type": "integer", "minimum": -5, "maximum": 500},
    "ok": {"type": "boolean"}},
    "required": ["name", "tags", "score", "ok"], "additionalProperties": False}


def test_bounded_json_schema_validates_for_20_seeds(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0) as c:
            return await asyncio.gather(*[c.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=100, temperature=1.0, seed=seed,
                response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": BOUNDED,
                                                                        "strict": True}})
                for seed in range(20)])

    for resp in asyncio.run(run()):
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content), BOUNDED)


def test_unsupported_schema_is_a_clear_400(server):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "integer", "multipleOf": 3}}}}}
    r = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, json={"model": MODEL, "messages": ASK,
                                                                       "response_format": bad})
    err = r.json()["error"]
    assert r.status_code == 400 and "'multipleOf'" in err["message"] and "properties.a" in err["message"]


# ---- n choices -------------------------------------------------------------------------------------------------

def _streamed_texts(chunks, chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            piece = (ch.delta.content or "") if chat else ch.text
            texts[ch.index] = texts.get(ch.index, "") + piece
    return texts


def test_n_choices_equal_single_requests_with_derived_seeds(client):
    """Choice j of a prompt samples with seed + j (documented); streamed equals whole; usage counts the prompt
    once and every choice's tokens."""
    kw = dict(model=MODEL, max_tokens=8, temperature=1.0, seed=77)
    prompts = ["Llamas graze on", "The herd moved"]
    many = client.completions.create(prompt=prompts, n=3, **kw)
    assert [c.index for c in many.choices] == list(range(6))
    singles = [client.completions.create(prompt=p, **dict(kw, seed=77 + j)) for p in prompts for j in range(3)]
    assert [c.text for c in many.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in many.choices[:3]}) > 1  # three seeds, not three copies
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens + singles[3].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    chunks = list(client.completions.create(prompt=prompts, n=3, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert _streamed_texts(chunks[:-1], chat=False) == {c.index: c.text for c in many.choices}
    assert chunks[-1].usage.prompt_tokens == many.usage.prompt_tokens

    chat = client.chat.completions.create(messages=ASK, n=2, logprobs=True, **kw)
    assert [c.index for c in chat.choices] == [0, 1]
    for j, choice in enumerate(chat.choices):
        one = client.chat.completions.create(messages=ASK, logprobs=True, **dict(kw, seed=77 + j)).choices[0]
        assert choice.message.content == one.message.content and choice.finish_reason == one.finish_reason
        assert [t.logprob for t in choice.logprobs.content] == pytest.approx(
            [t.logprob for t in one.logprobs.content], abs=1e-4)
    streamed = _streamed_texts(client.chat.completions.create(messages=ASK, n=2, stream=True, **kw), chat=True)
    assert streamed == {c.index: c.message.content for c in chat.choices}


# ---- discoverability ------------------------------------------------------------------------------------------

def test_openapi_tokenize_detokenize(server, logp):
    from openapi_spec_validator import validate

    spec = httpx.get(f"{server}/openapi.json").json()
    validate(spec)
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "$ref" in body
        assert "400" in spec["paths"][path]["post"]["responses"]
    schemas = spec["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    r = httpx.post(f"{server}/tokenize", headers=AUTH, json={"model": MODEL, "prompt": "Hello llamas"}).json()
    assert r["tokens"] == logp.tokenizer.encode("Hello llamas") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024
    r2 = httpx.post(f"{server}/tokenize", headers=AUTH, json={"model": MODEL, "messages": ASK}).json()
    assert r2["count"] > r["count"]
    d = httpx.post(f"{server}/detokenize", headers=AUTH, json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert d["prompt"] == logp.tokenizer.decode(r["tokens"])
    bad = httpx.post(f"{server}/detokenize", headers=AUTH, json={"model": MODEL, "tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"

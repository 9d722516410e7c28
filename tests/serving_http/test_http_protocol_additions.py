"""The request checks behind the OpenAI additions (serving/api/protocol.py), without a server: what reaches the
engine (sampling settings, grammars) and the chat template (messages), and the 400s that name the field."""
from __future__ import annotations

import json

import pytest

from serving.api import protocol as P
from serving.api.errors import ApiError

TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["CET", "UTC"]}}, "required": ["tz"]}}},
         {"type": "function", "function": {"name": "ping"}}]
USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return P.ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def test_sampling_fields_reach_the_engine_by_their_names():
    req = chat(frequency_penalty=0.5, presence_penalty=-1.0, repetition_penalty=1.2, min_p=0.1, top_k=-1,
               logit_bias={"17": -100, "5": 2.5}, stop_token_ids=[9], logprobs=True, top_logprobs=4, seed=3)
    assert P.sampling_fields(req) == {
        "frequency_penalty": 0.5, "presence_penalty": -1.0, "repetition_penalty": 1.2, "min_p": 0.1, "top_k": 0,
        "logit_bias": {17: -100.0, 5: 2.5}, "stop_token_ids": [9], "logprobs": 4, "seed": 3}
    comp = P.CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]], "echo": True, "logprobs": 2})
    assert P.sampling_fields(comp) == {"logprobs": 2, "prompt_logprobs": 2}
    assert P.check_completion(comp) == [[1, 2], [3]]


def test_tool_choice_becomes_a_grammar_for_one_call():
    job = P.check_chat(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    schema = job["structured"]["json"]
    assert schema["properties"]["name"] == {"enum": ["get_time"]}
    assert schema["properties"]["parameters"] == TOOLS[0]["function"]["parameters"]
    job = P.check_chat(chat(tools=TOOLS, tool_choice="required"))
    assert [s["properties"]["name"]["enum"] for s in job["structured"]["json"]["anyOf"]] == [["get_time"], ["ping"]]
    assert job["tool_names"] == ["get_time", "ping"] and len(job["tools"]) == 2
    auto = P.check_chat(chat(tools=TOOLS))
    assert auto["structured"] is None and auto["tool_names"] == ["get_time", "ping"]
    none = P.check_chat(chat(tools=TOOLS, tool_choice="none"))
    assert none["tools"] is None and none["tool_names"] is None
    fmt = P.check_chat(chat(response_format={"type": "json_object"}))
    assert fmt["structured"] == {"json_object": True}


def test_tool_messages_are_shaped_for_the_template():
    msgs = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
            {"id": "c2", "type": "function", "function": {"name": "ping", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "pong"},
        {"role": "tool", "tool_call_id": "c1", "content": '{"time": "10:00"}'},
        {"role": "user", "content": "thanks"}]
    out = P.check_chat(chat(messages=msgs, tools=TOOLS))["messages"]
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}},
        {"type": "function", "function": {"name": "ping", "arguments": {}}}]}
    assert out[2:4] == [{"role": "tool", "content": {"time": "10:00"}}, {"role": "tool", "content": "pong"}]
    assert out[4] == {"role": "user", "content": "thanks"}


@pytest.mark.parametrize("fields, param, words", [
    (dict(messages=USER + [{"role": "tool", "content": "x"}]), "messages[1].role", "must answer a preceding"),
    (dict(messages=USER + [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "ping", "arguments": "{"}}]}]), "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    (dict(messages=USER + [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "ping", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "zz", "content": "x"}]),
     "messages[2].tool_call_id", "matches no call"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
     "not among 'tools'"),
    (dict(tool_choice="required"), "tool_choice", "no 'tools' are given"),
    (dict(tools=TOOLS + [TOOLS[1]]), "tools[2].function.name", "appears twice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {}}}}}}], tool_choice="required"),
     "tools[0].function.parameters", "'not'"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format",
     "cannot both constrain"),
    (dict(response_format={"type": "xml"}), "response_format.type", "'json_schema'"),
    (dict(functions=[{"name": "f"}]), "functions", "send 'tools'"),
])
def test_refusals_name_the_field(fields, param, words):
    with pytest.raises(ApiError) as e:
        P.check_chat(chat(**fields))
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


def test_openai_shapes_of_logprobs():
    positions = [["Hi", -0.5, [["Hi", -0.5], ["Yo", -1.5]]], [" there", -2.0, [[" you", -0.1]]]]
    chat_lp = P.chat_logprobs(positions)
    assert chat_lp["content"][1] == {"token": " there", "logprob": -2.0, "bytes": list(b" there"),
                                     "top_logprobs": [{"token": " you", "logprob": -0.1, "bytes": list(b" you")}]}
    comp = P.completion_logprobs([["<s>", None, None]] + positions, offset=0)
    assert comp == {"tokens": ["<s>", "Hi", " there"], "token_logprobs": [None, -0.5, -2.0],
                    "top_logprobs": [None, {"Hi": -0.5, "Yo": -1.5}, {" you": -0.1, " there": -2.0}],
                    "text_offset": [0, 3, 5]}
    json.dumps(comp)

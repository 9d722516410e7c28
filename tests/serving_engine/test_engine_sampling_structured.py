"""Structured output and prompt log-probabilities in the engine, on the tiny scout checkpoint.

A batch mixes JSON-schema-constrained and free sequences: constrained ones validate and end with "stop", free ones
are token for token what they are alone; each schema compiles once. Prompt and output log-probabilities equal
transformers' log_softmax within 1e-4 (fp32).
"""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from serving.engine import SamplingParams
from serving.engine.params import StructuredOutputsParams
from serving.engine.structured import check_json_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["city", "days", "unit", "tags"],
    "additionalProperties": False,
}


def test_batch_mixes_constrained_and_free_sequences(scout_engine, prompts):
    eng = scout_engine
    spec = StructuredOutputsParams(json=SCHEMA)
    free = SamplingParams(temperature=0.8, seed=5, max_tokens=20, ignore_eos=True)
    alone = eng.generate([prompts(12, seed=3)], free)[0].outputs[0].token_ids
    compiled = eng.grammars.compiled
    outs = eng.generate(
        [prompts(10, seed=1), prompts(12, seed=3), prompts(7, seed=2), "The weather"],
        [SamplingParams(temperature=1.0, seed=11, max_tokens=80, structured_outputs=spec), free,
         SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=spec),
         SamplingParams(temperature=1.0, seed=12, max_tokens=80, structured_outputs=StructuredOutputsParams(
             json_object=True), repetition_penalty=1.3)])
    assert outs[1].outputs[0].token_ids == alone
    for o in (outs[0], outs[2]):
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    obj = outs[3].outputs[0]  # any JSON object: unbounded, so a random model may run out of tokens inside it
    assert obj.text.lstrip().startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    # one schema (used twice) and the JSON-object grammar: each compiled once
    assert eng.grammars.compiled - compiled <= 2
    eng.generate([prompts(5, seed=9)], SamplingParams(max_tokens=3, structured_outputs=spec))
    assert eng.grammars.compiled - compiled <= 2


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "schema.properties.a uses"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "integer", "multipleOf": 3}, "'multipleOf'"),
    ({"anyOf": [{"type": "string"}, {"if": {}}]}, r"schema.anyOf\[1\] uses JSON-schema keyword\(s\) 'if'"),
])
def test_unsupported_schema_keywords_are_named(scout_engine, schema, words):
    with pytest.raises(ValueError, match=words):
        check_json_schema(schema)
    with pytest.raises(ValueError, match=words):
        scout_engine.make_request("x", [1, 2, 3], SamplingParams(structured_outputs=StructuredOutputsParams(
            json=schema)))


@pytest.mark.parametrize("length", [9, 75])
def test_prompt_and_output_logprobs_equal_transformers(scout_tiny, scout_engine, reference, prompts, length):
    """Every prompt position is scored from the piece that computes it: a 75-token prompt over 32-token attention
    chunks takes 3 steps to its first token (it took 75 when the executor returned one row per piece)."""
    prompt = prompts(length, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=5, prompt_logprobs=5, repetition_penalty=1.5)
    scout_engine.add_request("scored", prompt, params)
    req, steps = scout_engine._requests["scored"], 0
    while not req.num_generated:
        scout_engine.step()
        steps += 1
    assert steps == -(-length // scout_engine.config.attention_chunk_size)
    while scout_engine.has_unfinished_requests():
        (out,) = scout_engine.step()
    ids = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        logp_TV = torch.log_softmax(reference(scout_tiny)(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):  # position i is scored by the logits after token i-1
        pos = out.prompt_logprobs[i]
        assert prompt[i] in pos and len(pos) in (5, 6)
        for t, lp in pos.items():
            assert lp.logprob == pytest.approx(logp_TV[i - 1, t].item(), abs=1e-4)
            assert lp.rank == int((logp_TV[i - 1] > logp_TV[i - 1, t]).sum()) + 1
    for j, pos in enumerate(out.outputs[0].logprobs):  # raw model distribution, before the penalty
        row = logp_TV[len(prompt) - 1 + j]
        for t, lp in pos.items():
            assert lp.logprob == pytest.approx(row[t].item(), abs=1e-4)
    # prompt scoring changes nothing about the answer
    plain = scout_engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4,
                                                           repetition_penalty=1.5))[0]
    assert plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_bounded_strings_refuse_control_characters(scout_engine):
    """JSON forbids raw control characters in strings (json.loads and pydantic refuse them): the grammar too."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}
    for text, ok in (('{"a": "x\x06', False), ('{"a": "x\\n', False), ('{"a": "xyz"}', True)):
        state = scout_engine.grammars.new_state(StructuredOutputsParams(json=schema))
        assert state.matcher.accept_string(text) is ok, text
    with pytest.raises(ValueError, match="combines 'pattern' with 'minLength'"):
        check_json_schema({"type": "string", "pattern": "^a+$", "maxLength": 3})


def test_n_samples_each_follow_the_schema_with_a_grammar_of_their_own(scout_engine, prompts):
    """n=3 under a JSON schema: each sample advances its own grammar state (a shared one would break at the first
    differing token), validates, and equals the single request with its derived seed."""
    spec = StructuredOutputsParams(json=SCHEMA)
    ids = prompts(10, seed=21)
    (out,) = scout_engine.generate([ids], SamplingParams(n=3, temperature=1.0, seed=40, max_tokens=80,
                                                         structured_outputs=spec))
    singles = scout_engine.generate([ids] * 3, [SamplingParams(temperature=1.0, seed=40 + i, max_tokens=80,
                                                               structured_outputs=spec) for i in range(3)])
    assert len({o.text for o in out.outputs}) > 1
    for got, want in zip(out.outputs, singles):
        assert got.finish_reason == "stop", got.text
        jsonschema.validate(json.loads(got.text), SCHEMA)
        assert got.token_ids == want.outputs[0].token_ids

"""OpenAI request bodies as closed pydantic models, and the JSON bodies herd answers with.

Requests are strict (no "10" for 10, no true for 1) and closed (an unknown field is a 400 with a "did you mean"),
listing every field OpenAI's API defines so that clients such as the `openai` package and LangChain pass; fields
herd does not implement (`best_of` > 1, `suffix`) are accepted only at their neutral value, and
anything else is a 400 naming the field. `check_chat` / `check_completion` then apply the rules pydantic cannot
express (roles, content parts, tools, response formats) and turn the request into what the model replica runs:
chat messages shaped for Llama 4's chat template (tool-call arguments as dicts, tool results in call order),
sampling settings, and a grammar for `response_format` / `tool_choice` required or named.
"""
from __future__ import annotations

import json
import re
import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from serving.api.errors import bad_request

MAX_STOP_SEQUENCES = 4
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_CHAT_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_PROMPTS = 64  # prompts in one completions request
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Closed):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage of the request.")
    continuous_usage_stats: bool = Field(False, description="Accepted for vLLM clients; herd reports usage once.")


class ChatMessage(BaseModel):
    # Messages stay open: clients attach fields such as `name`, `tool_calls`, `refusal`; herd reads role + content.
    model_config = ConfigDict(extra="allow", strict=True)
    role: str = Field(description="system, developer (treated as system), user, assistant or tool.")
    content: Union[str, list[dict[str, Any]], None] = Field(None, description="Text, or a list of text parts.")
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = Field(None, description="An assistant's earlier calls.")
    tool_call_id: Optional[str] = Field(None, description="On a tool message: the call it answers.")


class _SamplingFields(_Closed):
    model: str = Field(description="The served model name, as listed by GET /v1/models.")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1.")
    top_k: Optional[int] = Field(None, ge=-1, description="vLLM extension: sample among the k likeliest; 0/-1 off.")
    n: Optional[int] = Field(None, ge=1, le=128, description="Choices per prompt: the prompt is computed once and "
                             "its cache blocks shared; with a seed, choice i samples with seed + i.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 sequences that end the completion.")
    seed: Optional[int] = Field(None, ge=-(2 ** 63), lt=2 ** 64, description="Makes sampling reproducible.")
    stream: Optional[bool] = Field(False, description="Answer with server-sent events ending in [DONE].")
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, max_length=256, description="End-user id, counted (hashed) for the licence.")
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256,
                                      description="vLLM extension: only requests with the same salt share cached "
                                                  "prompt blocks (prefix caching).")
    ignore_eos: Optional[bool] = Field(None, description="vLLM extension: keep generating past end-of-turn.")
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0,
                                               description="Lowers a token's logit by this per earlier occurrence.")
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0,
                                              description="Lowers the logit of every token already generated.")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id (as a string) -> bias in [-100, 100] "
                                                   "added to its logit.")
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0, description="vLLM extension: >1 divides "
                                                "the logits of prompt and output tokens (1 = off).")
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0, description="vLLM extension: drop tokens below min_p x "
                                   "the likeliest token's probability.")
    stop_token_ids: Optional[list[int]] = Field(None, description="vLLM extension: token ids that end the answer.")
    # OpenAI fields herd accepts only at their neutral value.
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate (deprecated name).")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate.")
    logprobs: Optional[bool] = Field(None, description="Return the log-probability of each generated token.")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_CHAT_LOGPROBS,
                                        description="With logprobs: also the k likeliest tokens at each position.")
    response_format: Optional[dict[str, Any]] = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                          '{"name": ..., "schema": {...}}}: enforced by a grammar at every step.')
    tools: Optional[list[dict[str, Any]]] = Field(
        None, description='Functions the model may call: [{"type": "function", "function": {"name", "description", '
                          '"parameters"}}].')
    tool_choice: Union[str, dict[str, Any], None] = Field(
        None, description='"none", "auto", "required" or {"type": "function", "function": {"name": ...}}; the last '
                          'two are enforced by constrained decoding.')
    parallel_tool_calls: Optional[bool] = Field(None, description="Allow several calls in one answer (default true).")
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Union[str, dict[str, Any], None] = None
    modalities: Optional[list[str]] = None
    reasoning_effort: Optional[str] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(description="Text or token ids.")
    max_tokens: Optional[int] = Field(16, ge=1, description="Most tokens to generate; default 16.")
    echo: Optional[bool] = Field(None, description="Put the prompt before the completion (with its log-probabilities "
                                 "when logprobs is set; the first is null).")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                    description="Log-probabilities of each token and of the k likeliest.")
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)


def known_fields(model: type[BaseModel]) -> dict[str, list[str]]:
    """Field names by parent path, for "did you mean" on unknown keys."""
    return {"": list(model.model_fields), "stream_options": list(StreamOptions.model_fields)}


def _check_common(req: _SamplingFields) -> None:
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' has {len(req.stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed.",
                          param="stop", code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed with stream=true.", param="stream_options",
                          code="invalid_value")
    for key, bias in (req.logit_bias or {}).items():
        if not key.isdigit():
            raise bad_request(f"'logit_bias' keys must be token ids written as strings, like \"1234\" (got {key!r}).",
                              param="logit_bias", code="invalid_value")
        if not -100.0 <= bias <= 100.0:
            raise bad_request(f"'logit_bias' values must be between -100 and 100 (got {bias} for token {key}).",
                              param="logit_bias", code="invalid_value")
    if any(t < 0 for t in req.stop_token_ids or ()):
        raise bad_request("'stop_token_ids' must hold non-negative token ids.", param="stop_token_ids",
                          code="invalid_value")


def check_chat(req: ChatCompletionRequest) -> dict[str, Any]:
    """Apply the rules pydantic cannot; return what the replica needs: `messages` (for the chat template), `tools`
    (rendered by the template, or None), `tool_names` (parse the answer for calls when set) and `structured` (a
    grammar: {"json": schema} or {"json_object": True}, or None)."""
    _check_common(req)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
    for name in ("functions", "function_call"):
        if getattr(req, name) is not None:
            raise bad_request(f"'{name}' is OpenAI's deprecated form; send 'tools' and 'tool_choice' instead.",
                              param=name, code="unsupported_value")
    if req.modalities and set(req.modalities) != {"text"}:
        raise bad_request("herd answers with text only; set 'modalities' to [\"text\"] or leave it unset.",
                          param="modalities", code="unsupported_value")
    tools = _check_tools(req.tools)
    choice = _tool_choice(req, tools)
    structured = _response_format(req.response_format)
    tool_names = None
    if choice != "none" and tools:
        tool_names = set(tools)
        if choice != "auto":
            if structured is not None:
                raise bad_request("'response_format' and a forced 'tool_choice' cannot both constrain the answer; "
                                  "drop one.", param="response_format", code="invalid_value")
            # One call, in Llama 4's JSON form: a grammar for "one or more" lets a weak model call forever.
            names = list(tools) if choice == "required" else [choice]
            structured = {"json": _call_schema(tools, names)}
    return {"messages": _messages(req.messages), "tools": [tools[n] for n in tools] if tool_names else None,
            "tool_names": sorted(tool_names) if tool_names else None, "structured": structured,
            "parallel_tool_calls": req.parallel_tool_calls is not False}


def _check_tools(tools: Optional[list[dict[str, Any]]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i, t in enumerate(tools or ()):
        where = f"tools[{i}]"
        fn = t.get("function")
        if t.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                              "\"parameters\": {...}}}.", param=where, code="invalid_value")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise bad_request(f"{where}.function.name must be 1-64 letters, digits, '_' or '-' (got {name!r}).",
                              param=f"{where}.function.name", code="invalid_value")
        if name in out:
            raise bad_request(f"{where}: the function name '{name}' appears twice.", param=f"{where}.function.name",
                              code="invalid_value")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"{where}.function.parameters must be a JSON schema object.",
                              param=f"{where}.function.parameters", code="invalid_value")
        out[name] = {"type": "function", "function": {**fn, "parameters": params}}
    return out


def _tool_choice(req: ChatCompletionRequest, tools: dict) -> str:
    """'none', 'auto', 'required', or the name of the one function to call."""
    c = req.tool_choice
    if c is None:
        return "auto" if tools else "none"
    if isinstance(c, str):
        if c not in ("none", "auto", "required"):
            raise bad_request(f"'tool_choice' must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                              f"\"function\": {{\"name\": ...}}}} (got {c[:40]!r}).", param="tool_choice",
                              code="invalid_value")
        if c == "required" and not tools:
            raise bad_request("'tool_choice' is 'required' but no 'tools' are given.", param="tool_choice",
                              code="invalid_value")
        return c
    name = (c.get("function") or {}).get("name") if c.get("type") == "function" else None
    if not isinstance(name, str):
        raise bad_request("'tool_choice' as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                          param="tool_choice", code="invalid_value")
    if name not in tools:
        raise bad_request(f"'tool_choice' names '{name[:64]}', which is not among 'tools' "
                          f"({', '.join(tools) or 'none given'}).", param="tool_choice", code="invalid_value")
    return name


def _call_schema(tools: dict[str, dict], names: list[str]) -> dict:
    """JSON schema of Llama 4's JSON call form for these functions: what constrained decoding produces."""
    from serving.engine.structured import check_json_schema

    one = []
    for n in names:
        params = tools[n]["function"]["parameters"]
        try:
            check_json_schema(params, "parameters")
        except ValueError as e:
            i = list(tools).index(n)
            raise bad_request(f"tools[{i}].function.{e}", param=f"tools[{i}].function.parameters",
                              code="unsupported_schema") from None
        one.append({"type": "object", "properties": {"name": {"enum": [n]}, "parameters": params},
                    "required": ["name", "parameters"], "additionalProperties": False})
    return one[0] if len(one) == 1 else {"anyOf": one}


def _response_format(rf: Optional[dict[str, Any]]) -> Optional[dict]:
    if rf is None or rf.get("type") == "text":
        return None
    kind = rf.get("type")
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema' (got {kind!r}).",
                          param="response_format.type", code="invalid_value")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise bad_request("'response_format.json_schema' must be {\"name\": ..., \"schema\": {...}}.",
                          param="response_format.json_schema", code="invalid_value")
    from serving.engine.structured import check_json_schema

    schema = spec.get("schema", {"type": "object"})
    try:
        check_json_schema(schema, "response_format.json_schema.schema")
    except ValueError as e:
        raise bad_request(str(e), param="response_format.json_schema.schema", code="unsupported_schema") from None
    return {"json": schema}


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as Llama 4's chat template reads them: arguments as dicts (the template applies `tojson` to them),
    JSON tool results parsed (rendered once, not as a quoted string), and each run of tool results put in the
    order of the calls they answer (the template drops `tool_call_id`, so order is all that pairs them)."""
    out: list[dict[str, Any]] = []
    call_ids: list[Optional[str]] = []  # ids of the latest assistant calls
    run: list[tuple[int, dict]] = []  # the current run of tool results: (position among calls, message)
    for i, m in enumerate(messages):
        if m.role != "tool" and run:
            out.extend(msg for _, msg in sorted(run, key=lambda r: r[0]))
            run = []
        if m.role == "tool":
            if not call_ids:
                raise bad_request(f"messages[{i}] (tool) must answer a preceding assistant message with "
                                  "'tool_calls'.", param=f"messages[{i}].role", code="invalid_value")
            pos = len(run)
            if m.tool_call_id is not None and any(c is not None for c in call_ids):
                if m.tool_call_id not in call_ids:
                    raise bad_request(f"messages[{i}].tool_call_id '{m.tool_call_id[:64]}' matches no call of the "
                                      "preceding assistant message.", param=f"messages[{i}].tool_call_id",
                                      code="invalid_value")
                pos = call_ids.index(m.tool_call_id)
            run.append((pos, {"role": "tool", "content": _tool_result(_text(i, m))}))
            continue
        msg = _message(i, m)
        call_ids = []
        if m.role == "assistant" and m.tool_calls:
            msg["tool_calls"], call_ids = _assistant_calls(i, m.tool_calls)
        out.append(msg)
    out.extend(msg for _, msg in sorted(run, key=lambda r: r[0]))
    return out


def _assistant_calls(i: int, calls: list[dict]) -> tuple[list[dict], list[Optional[str]]]:
    rendered, ids = [], []
    for j, c in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., "
                              "\"arguments\": \"{...}\"}}}.", param=where, code="invalid_value")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise bad_request(f"{where}.function.arguments is not valid JSON.", param=f"{where}.function.arguments",
                                  code="invalid_value") from None
        if not isinstance(args, dict):
            raise bad_request(f"{where}.function.arguments must be a JSON object.",
                              param=f"{where}.function.arguments", code="invalid_value")
        rendered.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
        ids.append(c.get("id"))
    return rendered, ids


def _tool_result(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (dict, list)) else text


def _text(i: int, m: ChatMessage) -> str:
    return _message(i, m)["content"]


def _message(i: int, m: ChatMessage) -> dict[str, Any]:
    if m.role not in ROLES:
        raise bad_request(f"Unknown role '{m.role[:40]}' in messages[{i}]; use one of {', '.join(ROLES)}.",
                          param=f"messages[{i}].role", code="invalid_value")
    role = "system" if m.role == "developer" else m.role
    if m.content is None:
        if role != "assistant":
            raise bad_request(f"messages[{i}] ({m.role}) has no content.", param=f"messages[{i}].content",
                              code="missing_field")
        return {"role": role, "content": ""}
    if isinstance(m.content, str):
        return {"role": role, "content": m.content}
    texts, parts = [], []
    for j, part in enumerate(m.content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type")
        if kind in ("image_url", "image", "input_image"):
            parts.append(_image_part(where, part, m.role))
            continue
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{where} must be {{\"type\": \"text\", \"text\": \"...\"}} (got type {kind!r}).",
                              param=where, code="invalid_value")
        texts.append(part["text"])
        parts.append({"type": "text", "text": part["text"]})
    if len(parts) > len(texts):  # images: the template renders each {"type": "image"} part as <|image|>
        return {"role": role, "content": parts}
    return {"role": role, "content": "".join(texts)}


def _image_part(where: str, part: dict, role: str) -> dict[str, str]:
    """An OpenAI image part -> the template's {"type": "image"}, carrying its URL and place for the replica,
    which fetches, checks and decodes it (serving/api/images.py)."""
    if role != "user":
        raise bad_request(f"{where}: images are accepted in user messages only.", param=where,
                          code="invalid_value")
    if part.get("type") != "image_url":
        raise bad_request(f"{where}: send images as {{\"type\": \"image_url\", \"image_url\": {{\"url\": "
                          "\"data:image/png;base64,...\"}}.", param=where, code="invalid_value")
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.image_url.url must be a string (a data: URL, or http(s) where allowed).",
                          param=f"{where}.image_url.url", code="invalid_value")
    detail = spec.get("detail", "auto") if isinstance(spec, dict) else "auto"
    if detail not in ("auto", "low", "high"):
        raise bad_request(f"{where}.image_url.detail must be 'auto', 'low' or 'high'.",
                          param=f"{where}.image_url.detail", code="invalid_value")
    return {"type": "image", "url": url, "where": where}


def check_completion(req: CompletionRequest) -> list[Union[str, list[int]]]:
    """Apply the rules pydantic cannot; return the prompts (text or token ids), one choice each."""
    _check_common(req)
    if req.suffix:
        raise bad_request("'suffix' (insertion) is not supported; leave it unset.", param="suffix",
                          code="unsupported_value")
    if req.best_of not in (None, 1):
        raise bad_request("'best_of' other than 1 is not supported.", param="best_of", code="unsupported_value")
    p = req.prompt
    prompts = list(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
    for i, one in enumerate(prompts):
        if isinstance(one, list) and not one or one == "":
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise bad_request(f"'{where}' is empty.", param=where, code="invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request.",
                          param="prompt", code="invalid_value")
    return prompts


def sampling_fields(req: _SamplingFields) -> dict[str, Any]:
    """The request's sampling settings as SamplingParams keyword arguments (unset fields keep engine defaults)."""
    _check_common(req)
    out: dict[str, Any] = {}
    for name in ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "min_p"):
        if getattr(req, name) is not None:
            out[name] = getattr(req, name)
    if req.top_k is not None:
        out["top_k"] = max(req.top_k, 0)
    if req.stop:
        out["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.ignore_eos:
        out["ignore_eos"] = True
    if req.logit_bias:
        out["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
    if req.stop_token_ids:
        out["stop_token_ids"] = list(req.stop_token_ids)
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            out["logprobs"] = req.top_logprobs or 0
    elif req.logprobs is not None:
        out["logprobs"] = req.logprobs
        if req.echo:
            out["prompt_logprobs"] = req.logprobs
    return out


# ---- responses -----------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, created: int, choices: list[dict], pt: int, ct: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(pt, ct)}


def chat_choice(index: int, content: str | None, tool_calls: list[dict] | None, logprobs: dict | None,
                finish: str) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None, with_usage: bool,
               logprobs: dict | None = None, index: int = 0) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
    if with_usage:
        out["usage"] = None
    return out


def chat_logprobs(positions: list) -> dict:
    """OpenAI's chat `logprobs` from the replica's positions [token, logprob, [[token, logprob], ...]]."""
    def entry(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]} for t, lp, top in positions],
            "refusal": None}


def completion_logprobs(positions: list, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`; a None position (the prompt's first token under echo) has no values."""
    tokens, lps, tops, offsets = [], [], [], []
    for pos in positions:
        tok = pos[0]
        tokens.append(tok)
        lps.append(pos[1])
        if pos[1] is None:
            tops.append(None)
        else:
            top = {a: b for a, b in pos[2]}
            top.setdefault(pos[0], pos[1])
            tops.append(top)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_response(rid: str, model: str, created: int, choices: list[dict], pt: int, ct: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(pt, ct)}


def completion_choice(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None, with_usage: bool,
                     logprobs: dict | None = None, index: int = 0) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [completion_choice(index, text, logprobs, finish)]}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(rid: str, model: str, created: int, obj: str, pt: int, ct: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(pt, ct)}


def model_list(name: str, max_model_len: int, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "herd", "max_model_len": max_model_len}]}


def openai_finish_reason(reason: str | None) -> str:
    """Engine finish reasons as OpenAI's: stop/length/tool_calls pass through; abort and error have no OpenAI name."""
    return reason if reason in ("stop", "length", "tool_calls") else (reason or "stop")


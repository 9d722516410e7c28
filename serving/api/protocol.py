"""OpenAI request bodies as closed pydantic models, and the JSON bodies herd answers with.

Requests are strict (no "10" for 10, no true for 1) and closed (an unknown field is a 400 with a "did you mean"),
listing every field OpenAI's API defines so that clients such as the `openai` package and LangChain pass; fields
herd does not implement are accepted only at their neutral value, and anything else is a 400 naming the field.
`check_chat` / `check_completion` then apply the rules pydantic cannot express (roles, content parts, n).
"""
from __future__ import annotations

import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from serving.api.errors import bad_request

MAX_STOP_SEQUENCES = 4
ROLES = ("system", "developer", "user", "assistant")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Closed):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage of the request.")
    continuous_usage_stats: bool = Field(False, description="Accepted for vLLM clients; herd reports usage once.")


class ChatMessage(BaseModel):
    # Messages stay open: clients attach fields such as `name`, `tool_calls`, `refusal`; herd reads role + content.
    model_config = ConfigDict(extra="allow", strict=True)
    role: str = Field(description="system, developer (treated as system), user or assistant.")
    content: Union[str, list[dict[str, Any]], None] = Field(None, description="Text, or a list of text parts.")
    name: Optional[str] = None


class _SamplingFields(_Closed):
    model: str = Field(description="The served model name, as listed by GET /v1/models.")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1.")
    top_k: Optional[int] = Field(None, ge=-1, description="vLLM extension: sample among the k likeliest; 0/-1 off.")
    n: Optional[int] = Field(None, ge=1, le=128, description="Completions per prompt; herd serves n=1.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 sequences that end the completion.")
    seed: Optional[int] = Field(None, ge=-(2 ** 63), lt=2 ** 64, description="Makes sampling reproducible.")
    stream: Optional[bool] = Field(False, description="Answer with server-sent events ending in [DONE].")
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, max_length=256, description="End-user id, counted (hashed) for the licence.")
    ignore_eos: Optional[bool] = Field(None, description="vLLM extension: keep generating past end-of-turn.")
    # OpenAI fields herd accepts only at their neutral value (checked in _check_neutral).
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate (deprecated name).")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate.")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Union[str, dict[str, Any], None] = None
    modalities: Optional[list[str]] = None
    reasoning_effort: Optional[str] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(description="Text or token ids.")
    max_tokens: Optional[int] = Field(16, ge=1, description="Most tokens to generate; default 16.")
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)


def known_fields(model: type[BaseModel]) -> dict[str, list[str]]:
    """Field names by parent path, for "did you mean" on unknown keys."""
    return {"": list(model.model_fields), "stream_options": list(StreamOptions.model_fields)}


def _check_neutral(req: _SamplingFields) -> None:
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n} is not supported: herd returns one choice per request; send n=1 "
                          "(or several requests).", param="n", code="unsupported_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"'{name}' is not supported by herd yet; leave it unset or 0.", param=name,
                              code="unsupported_value")
    if req.logit_bias:
        raise bad_request("'logit_bias' is not supported by herd yet; leave it unset.", param="logit_bias",
                          code="unsupported_value")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' has {len(req.stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed.",
                          param="stop", code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed with stream=true.", param="stream_options",
                          code="invalid_value")


def check_chat(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Apply the rules pydantic cannot; return the messages as plain {role, content} for the chat template."""
    _check_neutral(req)
    if req.logprobs or req.top_logprobs:
        raise bad_request("'logprobs' is not supported by herd yet; leave it unset.", param="logprobs",
                          code="unsupported_value")
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise bad_request(f"'{name}' (tool calling) is not supported by herd yet; leave it unset.", param=name,
                              code="unsupported_value")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("'tool_choice' must be unset, 'none' or 'auto' (no tools are served).",
                          param="tool_choice", code="unsupported_value")
    if req.response_format and req.response_format.get("type") != "text":
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported by herd yet.",
                          param="response_format", code="unsupported_value")
    if req.modalities and set(req.modalities) != {"text"}:
        raise bad_request("herd answers with text only; set 'modalities' to [\"text\"] or leave it unset.",
                          param="modalities", code="unsupported_value")
    return [_message(i, m) for i, m in enumerate(req.messages)]


def _message(i: int, m: ChatMessage) -> dict[str, str]:
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
    texts = []
    for j, part in enumerate(m.content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type")
        if kind in ("image_url", "image", "input_image"):
            raise bad_request(f"Image content ({where}) is not supported: herd serves Llama 4 as a text model "
                              "until vision is served; send text parts only.", param=where, code="unsupported_content")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{where} must be {{\"type\": \"text\", \"text\": \"...\"}} (got type {kind!r}).",
                              param=where, code="invalid_value")
        texts.append(part["text"])
    return {"role": role, "content": "".join(texts)}


def check_completion(req: CompletionRequest) -> Union[str, list[int]]:
    """Apply the rules pydantic cannot; return the one prompt (text or token ids)."""
    _check_neutral(req)
    if req.echo:
        raise bad_request("'echo' is not supported by herd yet; leave it unset.", param="echo",
                          code="unsupported_value")
    if req.logprobs:
        raise bad_request("'logprobs' is not supported by herd yet; leave it unset.", param="logprobs",
                          code="unsupported_value")
    if req.suffix:
        raise bad_request("'suffix' (insertion) is not supported; leave it unset.", param="suffix",
                          code="unsupported_value")
    if req.best_of not in (None, 1):
        raise bad_request("'best_of' other than 1 is not supported.", param="best_of", code="unsupported_value")
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise bad_request(f"'prompt' holds {len(p)} prompts; herd serves one prompt per request.",
                              param="prompt", code="unsupported_value")
        p = p[0]
    if isinstance(p, list) and not p or p == "":
        raise bad_request("'prompt' is empty.", param="prompt", code="invalid_value")
    return p


def sampling_fields(req: _SamplingFields) -> dict[str, Any]:
    """The request's sampling settings as SamplingParams keyword arguments (unset fields keep engine defaults)."""
    out: dict[str, Any] = {}
    if req.temperature is not None:
        out["temperature"] = req.temperature
    if req.top_p is not None:
        out["top_p"] = req.top_p
    if req.top_k is not None:
        out["top_k"] = max(req.top_k, 0)
    if req.stop:
        out["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.seed is not None:
        out["seed"] = req.seed
    if req.ignore_eos:
        out["ignore_eos"] = True
    return out


# ---- responses -----------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, created: int, text: str, finish: str, pt: int, ct: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(pt, ct)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None, with_usage: bool) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        out["usage"] = None
    return out


def completion_response(rid: str, model: str, created: int, text: str, finish: str, pt: int, ct: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(pt, ct)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None, with_usage: bool) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(rid: str, model: str, created: int, obj: str, pt: int, ct: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(pt, ct)}


def model_list(name: str, max_model_len: int, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "herd", "max_model_len": max_model_len}]}


def openai_finish_reason(reason: str | None) -> str:
    """Engine finish reasons as OpenAI's: stop/length pass through; abort and error have no OpenAI name."""
    return reason if reason in ("stop", "length") else (reason or "stop")


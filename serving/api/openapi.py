"""herd's OpenAPI 3.1 document (`GET /openapi.json`): every route with its request body and error responses.

The routes read the raw request (to parse it strictly and answer OpenAI-shaped errors), so FastAPI would describe
no bodies; the document is built here from the same pydantic models the routes validate with.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field
from pydantic.json_schema import models_json_schema

from serving.api import protocol as P


class TokenizeRequest(P._Closed):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: Optional[str] = Field(None, description="The served model name (optional).")
    prompt: Optional[str] = Field(None, description="Text to tokenize (or give messages).")
    messages: Optional[list[P.ChatMessage]] = Field(None, description="A conversation, rendered with the template.")
    tools: Optional[list[dict[str, Any]]] = Field(None, description="Tools rendered with the messages.")
    add_special_tokens: bool = Field(True, description="With a prompt: add the beginning-of-text token.")


class DetokenizeRequest(P._Closed):
    """vLLM's /detokenize."""

    model: Optional[str] = Field(None, description="The served model name (optional).")
    tokens: list[int] = Field(description="Token ids to turn back into text.")


def _error_schema() -> dict:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _errors(*codes: int) -> dict:
    words = {400: "Invalid request (the message names the field and the fix)", 401: "Missing or wrong API key",
             404: "Unknown model", 413: "Body too large", 503: "At capacity: retry after Retry-After",
             500: "Server error (names a request id)"}
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {str(c): {"description": words[c], "content": ref} for c in codes}


def _post(summary: str, model: str, ok: str, streams: bool = False) -> dict:
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string"},
                                        "example": "data: {...}\n\ndata: [DONE]\n\n"}
    return {"post": {"summary": summary, "operationId": model[0].lower() + model[1:],
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": f"#/components/schemas/{model}"}}}},
                     "responses": {"200": {"description": ok, "content": content},
                                   **_errors(400, 401, 404, 413, 500, 503)}}}


def openapi_document(title: str = "herd", version: str = "0.1.0") -> dict:
    models = [P.ChatCompletionRequest, P.CompletionRequest, TokenizeRequest, DetokenizeRequest]
    _, defs = models_json_schema([(m, "validation") for m in models],
                                 ref_template="#/components/schemas/{model}")
    schemas: dict[str, Union[dict, Any]] = dict(defs.get("$defs", {}))
    schemas["ErrorResponse"] = _error_schema()
    get_json = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible Llama 4 serving. Built with Llama."},
        "paths": {
            "/v1/chat/completions": _post("Chat completion (tools, response_format, logprobs, streaming)",
                                          "ChatCompletionRequest", "A chat.completion, or SSE chunks", True),
            "/v1/completions": _post("Text completion (echo, logprobs, lists of prompts, streaming)",
                                     "CompletionRequest", "A text_completion, or SSE chunks", True),
            "/tokenize": _post("Token ids of a prompt or a conversation (vLLM's shape)", "TokenizeRequest",
                               "{count, max_model_len, tokens, token_strs}"),
            "/detokenize": _post("Text of token ids (vLLM's shape)", "DetokenizeRequest", "{prompt}"),
            "/v1/models": {"get": {"summary": "The served model", "operationId": "listModels",
                                   "responses": {**get_json, **_errors(401)}}},
            "/health": {"get": {"summary": "200 while a model replica is alive, else 503", "operationId": "health",
                                "responses": {**get_json, "503": {"description": "No live model replica"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                                 "responses": {"200": {"description": "Prometheus text format"}}}},
        },
        "components": {"schemas": schemas},
    }

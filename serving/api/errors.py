"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`, with the right HTTP status.

Every failure a client can see goes through `ApiError`, so the shape is the same for 400/401/404/413/503/500 and a
500 never carries internals (only a request id to find the log line).
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import closest, field_path, first_error

# What OpenAI's clients expect in `type` for each status (the openai package maps status -> exception class).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
    500: "server_error",
}


@dataclass
class ApiError(Exception):
    """A request that failed in a way the client can act on; `param` names the offending field."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None  # set on 503: when the client should try again

    def __post_init__(self):
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}

    def to_dict(self) -> dict:
        """Plain form that crosses a Ray Serve handle without pickling an exception."""
        return {"status": self.status, "message": self.message, "param": self.param, "code": self.code,
                "retry_after_s": self.retry_after_s}

    @classmethod
    def from_dict(cls, d: dict) -> "ApiError":
        return cls(**d)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def queue_full(retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "The server is at capacity (request queue full); retry after the Retry-After delay.",
                    code="queue_full", retry_after_s=retry_after_s)


def internal_error(request_id: str) -> ApiError:
    return ApiError(500, f"Internal server error while handling request {request_id}; the server logged the cause.",
                    code="internal_error")


def from_validation_error(exc, known_fields: dict[str, list[str]] | None = None) -> ApiError:
    """A pydantic error as a 400 naming the field; unknown keys get a "did you mean".

    The error chosen, its path and the suggestion come from `common.errors`, as in every other herd message;
    only the wording follows OpenAI's (`param`, `code`).
    """
    err, loc, _ = first_error(exc)
    param = field_path(loc) or None
    msg = err["msg"]
    if err["type"] == "extra_forbidden" and loc:
        best = closest(loc[-1], (known_fields or {}).get(field_path(loc[:-1]), []))
        hint = f"; did you mean '{best}'?" if best is not None else "; remove it"
        return bad_request(f"Unknown field '{param}'{hint}", param=param, code="unknown_field")
    if err["type"] == "missing":
        return bad_request(f"Missing required field '{param}'.", param=param, code="missing_field")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return bad_request(f"Invalid value for '{param}': {msg} (got {shown}).", param=param, code="invalid_value")

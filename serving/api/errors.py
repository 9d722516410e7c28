"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`, with the right HTTP status.

Every failure a client can see goes through `ApiError`, so the shape is the same for 400/401/404/413/503/500 and a
500 never carries internals (only a request id to find the log line).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

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


def param_path(loc: tuple) -> str:
    """pydantic's location tuple as the field path a user reads: ('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def from_validation_error(exc, known_fields: dict[str, list[str]] | None = None) -> ApiError:
    """The first pydantic error as a 400 naming the field; unknown keys get a "did you mean"."""
    err = exc.errors()[0]
    # Skip pydantic's union-branch names (e.g. 'str', 'list[int]', function-after[...]) in the location.
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _is_branch_tag(str(p)))
    param = param_path(loc) or None
    msg = err["msg"]
    if err["type"] == "extra_forbidden" and loc:
        field = str(loc[-1])
        siblings = (known_fields or {}).get(param_path(loc[:-1]), [])
        close = difflib.get_close_matches(field, siblings, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; remove it"
        return bad_request(f"Unknown field '{param}'{hint}", param=param, code="unknown_field")
    if err["type"] == "missing":
        return bad_request(f"Missing required field '{param}'.", param=param, code="missing_field")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return bad_request(f"Invalid value for '{param}': {msg} (got {shown}).", param=param, code="invalid_value")


def _is_branch_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]", "dict"} \
        or "[" in part and not part.startswith("[") or part.startswith(("function-", "tagged-union"))

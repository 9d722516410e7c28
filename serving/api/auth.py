"""API keys: a file mapping each key to an identity (a team or user), checked on every request.

The file is YAML (JSON is YAML too):

    keys:
      sk-team-search-3f9a...: team-search
      sk-alice-77c1...: alice@example.com

Keys are held only as SHA-256 digests once loaded, so the deployment's arguments, which Ray stores and may
show in its dashboard, never contain a usable key. A request presents `Authorization: Bearer <key>`.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import UserError
from serving.api.errors import ApiError

MIN_KEY_CHARS = 16


class ApiKeysFile(BaseModel):
    """The API-keys file: each key maps to the identity licensing counts when a request names no user."""

    model_config = ConfigDict(extra="forbid")
    keys: dict[str, str] = Field(description="API key -> identity (team or user name).", min_length=1)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_api_keys(path: str | Path) -> dict[str, str]:
    """Read a keys file; return {sha256(key): identity}. Raises UserError naming the problem."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read the API keys file {path}: {e.strerror}; pass an existing file to "
                        "--api-keys-file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({e.__class__.__name__}); write `keys:` mapping each key "
                        "to an identity") from None
    try:
        parsed = ApiKeysFile.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{path}: {_where(err['loc'], raw)}: {err['msg']}; the file must be `keys:` mapping each API "
                        "key to an identity") from None
    out = {}
    for i, (key, ident) in enumerate(parsed.keys.items()):
        if len(key) < MIN_KEY_CHARS:
            # Never echo the key itself, only where it is.
            raise UserError(f"{path}: key number {i + 1} (identity {ident!r}) is shorter than {MIN_KEY_CHARS} "
                            "characters; use long random keys (e.g. `openssl rand -hex 24`)")
        if not ident.strip():
            raise UserError(f"{path}: key number {i + 1} has an empty identity; name the team or user it belongs to")
        out[digest(key)] = ident
    return out


def _where(loc: tuple, raw) -> str:
    """The error's place in the file without the key itself: a key is a secret, so it is named by its position."""
    if len(loc) >= 2 and loc[0] == "keys" and isinstance(raw, dict) and isinstance(raw.get("keys"), dict):
        keys = list(raw["keys"])
        n = keys.index(loc[1]) + 1 if loc[1] in keys else "?"
        return f"keys: key number {n}'s identity" + "".join(f".{p}" for p in loc[2:])
    return ".".join(str(p) for p in loc) or "(top level)"


class KeyChecker:
    """Checks `Authorization: Bearer` against the loaded digests; no keys configured means no auth."""

    def __init__(self, digests: dict[str, str] | None):
        self.digests = dict(digests or {})

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def identity(self, authorization: str | None) -> str | None:
        """The key's identity, or None when auth is off; raises a 401 ApiError for a missing or wrong key."""
        if not self.enabled:
            return None
        if not authorization:
            raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                           code="missing_api_key")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "Malformed Authorization header: expected 'Bearer <key>'.", code="invalid_api_key")
        d = digest(key.strip())
        for known, ident in self.digests.items():
            if hmac.compare_digest(known, d):
                return ident
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

"""Helpers of the reliability suite: deploy herd's app on the suite's Serve, the shared constants."""
from __future__ import annotations

from herd_testing import deploy_app

API_KEY = "sk-reliability-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 96


def deploy(name: str, port: int, **args) -> str:
    """Deploy herd's app with `args` and wait until a replica is up; returns the URL."""
    args.setdefault("max_model_len", MAX_MODEL_LEN)
    return deploy_app(name, port, **args)


def keys_file(folder) -> str:
    path = folder / "api-keys.yaml"
    path.write_text(f"keys:\n  {API_KEY}: reliability\n")
    return str(path)

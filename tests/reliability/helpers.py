"""Helpers of the reliability suite: deploy herd's app on the suite's Serve, the shared constants."""
from __future__ import annotations

import time

API_KEY = "sk-reliability-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 96


def deploy(name: str, port: int, **args) -> str:
    """Deploy herd's app (build_app with `args`) at / and wait until /health says a replica is up; returns the URL."""
    import httpx
    from ray import serve

    from serving.app import build_app

    args.setdefault("max_model_len", MAX_MODEL_LEN)
    args.setdefault("dtype", "float32")
    args.setdefault("served_model_name", "scout-tiny")
    args.setdefault("app_name", name)
    args.setdefault("replica_num_cpus", 0.25)
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"app {name} did not answer on {base} within 120 s")


def keys_file(folder) -> str:
    path = folder / "api-keys.yaml"
    path.write_text(f"keys:\n  {API_KEY}: reliability\n")
    return str(path)

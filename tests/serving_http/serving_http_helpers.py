"""Helpers for the HTTP tests: deploy/delete herd's Serve app, read Prometheus samples, the shared constants."""
from __future__ import annotations

import time

from herd_testing import deploy_app as _deploy_app
from herd_testing import free_port  # noqa: F401  (re-exported for the test modules)

MAX_MODEL_LEN = 96
API_KEY = "sk-test-team-search-0123456789abcdef"
API_IDENTITY = "team-search"


def deploy_app(name: str, port: int, **args):
    """Deploy herd's app (build_app with `args`) at / and wait until it answers; returns the base URL."""
    args.setdefault("max_model_len", MAX_MODEL_LEN)
    return _deploy_app(name, port, **args)


def delete_app(name: str) -> None:
    from ray import serve

    serve.delete(name, _blocking=True)


def metric_value(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (summing every series that matches the given labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    if not found:
        raise KeyError(f"no sample {name} {labels} in /metrics")
    return total

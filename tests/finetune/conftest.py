"""Fixtures of the finetune tests (helpers live in ft_helpers.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path, where tests/finetune and tests/licensing would shadow the real packages as
# namespace packages; put the repository first and drop any shadow already imported.
_REPO = str(Path(__file__).resolve().parents[2])
if sys.path[0] != _REPO:
    sys.path.insert(0, _REPO)
for _name in ("finetune", "licensing"):
    _mod = sys.modules.get(_name)
    if _mod is not None and getattr(_mod, "__file__", None) is None:
        for _key in [k for k in sys.modules if k == _name or k.startswith(_name + ".")]:
            del sys.modules[_key]


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """boto3 client for the loopback S3 server."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server)

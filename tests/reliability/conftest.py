"""Fixtures of the reliability suite: Serve on a free loopback port for this folder's tests (started here and shut
down when the folder is done, so the other folders' Serve fixtures start their own)."""
from __future__ import annotations

import pytest

from herd_testing import free_port


@pytest.fixture(scope="package")
def serve_port(ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    yield port
    serve.shutdown()

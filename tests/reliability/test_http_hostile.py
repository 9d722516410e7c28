"""Hostile requests against a real Serve app: the server answers each one in OpenAI's error shape (or serves it),
never a 500, and keeps serving; /health reports the model replica's engine state. A tiny temperature, a body that
announces 100 MiB and sends a few bytes, clients that send a streaming request and never read the answer."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from reliability.helpers import AUTH, deploy, keys_file

pytestmark = pytest.mark.slow
APP = "reliability-hostile"


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, tmp_path_factory):
    from ray import serve

    base = deploy(APP, serve_port, model=str(scout_tiny), max_num_seqs=2, max_waiting_requests=4,
                  api_keys_file=keys_file(tmp_path_factory.mktemp("keys")))
    yield base
    serve.delete(APP, _blocking=True)


def _comp(**fields):
    return {"model": "scout-tiny", "prompt": "The herd", "max_tokens": 5, **fields}


def test_a_tiny_temperature_is_served_greedily_and_the_replica_stays_up(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        greedy = c.post("/v1/completions", json=_comp(temperature=0))
        assert greedy.status_code == 200, greedy.text
        for _ in range(3):  # repeated: a request that killed the loop would make the next ones 500
            r = c.post("/v1/completions", json=_comp(temperature=1e-40))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["healthy"] == 1


def _raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head.encode() + body)
    return s


def test_an_announced_huge_body_is_refused_without_sending_it(server):
    port = int(server.rsplit(":", 1)[1])
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 2**20}\r\n\r\n")
    s = _raw_request(port, head, b'{"model": "scout-tiny", "prompt": "')  # and then nothing more
    try:
        t0 = time.time()
        answer = b""
        while b"body_too_large" not in answer and time.time() - t0 < 30:
            part = s.recv(65536)
            if not part:
                break
            answer += part
        answer = answer.decode("latin-1")
        assert answer.startswith("HTTP/1.1 413"), answer[:300]
        assert "body_too_large" in answer and time.time() - t0 < 30
    finally:
        s.close()


def test_clients_that_never_read_do_not_stall_the_others(server):
    port = int(server.rsplit(":", 1)[1])
    body = json.dumps({"model": "scout-tiny", "prompt": "The herd", "max_tokens": 48, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    silent = [_raw_request(port, head, body) for _ in range(4)]  # they send, then never read a byte
    try:
        with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
            for _ in range(3):
                r = c.post("/v1/completions", json=_comp(temperature=0))
                assert r.status_code in (200, 503), r.text
            deadline = time.time() + 60
            while c.post("/v1/completions", json=_comp(temperature=0)).status_code != 200:
                assert time.time() < deadline, "the server stayed busy with clients that never read"
                time.sleep(1)
    finally:
        for s in silent:
            s.close()
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:  # and afterwards nothing is left running
        deadline = time.time() + 60
        while True:
            running = [line for line in c.get("/metrics").text.splitlines()
                       if line.startswith("herd:num_requests_running")]
            if running and float(running[0].split()[-1]) == 0.0:
                break
            assert time.time() < deadline, running
            time.sleep(1)

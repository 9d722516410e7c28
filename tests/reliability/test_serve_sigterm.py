"""`herd serve` stopped with SIGTERM (what a process manager or `kill` sends) stops every process it started:
Ray's GCS, raylet, dashboard agent, runtime-env agent, Serve's actors (issue 16, item 3)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from herd_testing import free_port

pytestmark = pytest.mark.slow


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_stops_everything_herd_serve_started(tmp_path, scout_tiny):
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": ""}
    argv = [sys.executable, "-m", "herd", "serve", str(scout_tiny), "--port", str(port), "--ray-address", "local",
            "--max-model-len", "64", "--max-num-seqs", "1"]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "herd: serving at" not in Path(log.name).read_text():
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.time() < deadline, "herd serve did not come up"
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "raylet" in names and "gcs_server" in names, names
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        deadline = time.time() + 60
        while _alive(started) and time.time() < deadline:
            time.sleep(1)
        assert _alive(started) == [], "still running after herd serve stopped:\n" + "\n".join(_alive(started))
        assert "herd: stopping" in Path(log.name).read_text()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in herd serve's session (test hygiene)
        except ProcessLookupError:
            pass

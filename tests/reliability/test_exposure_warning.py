"""A server listening beyond loopback without API keys says so loudly (issue 16, item 17)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host,keys,warned", [("0.0.0.0", None, True), ("10.1.2.3", None, True),
                                              ("::", None, True), ("0.0.0.0", "keys.yaml", False),
                                              ("127.0.0.1", None, False), ("localhost", None, False),
                                              ("::1", None, False)])
def test_exposure_warning(host, keys, warned):
    from serving.cli import exposure_warning

    line = exposure_warning(host, keys)
    assert (line is not None) == warned
    if warned:
        assert "WARNING" in line and "--api-keys-file" in line and host in line


def test_herd_serve_on_every_interface_without_keys_warns_first(scout_tiny, tmp_path):
    import os
    import signal
    import time

    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", str(scout_tiny), "--host", "0.0.0.0",
                                 "--ray-address", "127.0.0.1:1"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        try:
            deadline = time.time() + 60
            while "WARNING" not in log.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)  # the warning comes before Ray is contacted
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    text = log.read_text()
    assert "WARNING" in text and "0.0.0.0" in text and "--api-keys-file" in text, text[-2000:]

"""Licensing never fails open quietly (issue 16, item 13): serving says at start whether users are counted and where
(an absolute path or a URL, never a folder relative to some replica's working directory), and
`--require-licensing` refuses to start without a key, in one line, before Ray starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERD = [sys.executable, "-m", "herd"]
REPO = Path(__file__).resolve().parents[2]


def test_the_status_says_whether_and_where_users_are_counted(tmp_path, monkeypatch):
    from serving.usage import licensing_status

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HERD_LICENSING_STORE", raising=False)
    monkeypatch.setenv("HERD_LICENSING_KEY", "00112233445566778899aabbccddeeff")
    on = licensing_status()
    assert on.counting and on.store == str(tmp_path / "herd-data" / "licensing")  # absolute
    assert "counting users" in on.message and on.store in on.message and "0011" not in on.message
    monkeypatch.setenv("HERD_LICENSING_STORE", "s3://bucket/licensing")
    assert licensing_status().store == "s3://bucket/licensing"
    monkeypatch.delenv("HERD_LICENSING_KEY")
    off = licensing_status()
    assert not off.counting and "NOT counting" in off.message and "HERD_LICENSING_KEY" in off.message


def test_require_licensing_refuses_to_start_without_a_key(tmp_path, scout_tiny):
    env = {k: v for k, v in os.environ.items() if k != "HERD_LICENSING_KEY"}
    r = subprocess.run(HERD + ["serve", str(scout_tiny), "--require-licensing", "--ray-address", "local"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("herd: error: ") and "HERD_LICENSING_KEY" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_build_app_refuses_require_licensing_without_a_key(scout_tiny, monkeypatch):
    from common.errors import UserError
    from serving.app import build_app

    monkeypatch.delenv("HERD_LICENSING_KEY", raising=False)
    with pytest.raises(UserError, match="require_licensing.*HERD_LICENSING_KEY"):
        build_app({"model": str(scout_tiny), "require_licensing": True})

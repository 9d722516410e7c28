"""Jobs submitted to a separately started Ray head node (`ray start --head`, every port explicit, 127.0.0.1):
first with Ray's own `ray job submit` CLI, then resubmitted under the same name with `herd finetune submit`,
which resumes the run from its last checkpoint instead of starting over.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from herd_testing import free_port
from ft_helpers import job_dict, write_rows

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _head_env(home: Path, token: str) -> dict:
    """The environment of every Ray command here: this test's own token and an empty home (as on a fresh machine),
    so nothing is read from or written to the user's ~/.ray."""
    env = dict(os.environ)
    xdg = home.parent / "xdg"  # caches and settings (matplotlib's, for the loss plot) stay in the test's folder
    env.update(HOME=str(home), RAY_AUTH_TOKEN=token, XDG_CACHE_HOME=str(xdg / "cache"),
               XDG_CONFIG_HOME=str(xdg / "config"), MPLCONFIGDIR=str(xdg / "matplotlib"))
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2", PATH=f"{BIN}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def fresh_home(tmp_path) -> Path:
    """An empty home folder, as on a machine that never ran Ray."""
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def head_env(fresh_home, monkeypatch) -> dict:
    """A token made for this test, in the environment of the Ray commands and of this process (where
    `herd finetune submit` reads RAY_AUTH_TOKEN)."""
    token = secrets.token_hex(32)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return _head_env(fresh_home, token)


@pytest.fixture
def ray_head(tmp_path, head_env):
    """A Ray head node with its job server on 127.0.0.1; yields the job server URL; stopped by PID."""
    yield from _start_head(tmp_path, head_env)


def _distinct_ports(n: int) -> list[int]:
    """n free loopback ports, all different (free_port() alone can hand the same port out twice)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def _start_head(tmp_path: Path, env: dict):
    dash, gcs, nm, om, client, agent, agent_grpc, rt_agent, metrics = _distinct_ports(9)
    worker_lo = random.randrange(30000, 60000, 100)
    while any(worker_lo <= p < worker_lo + 100 for p in (dash, gcs, nm, om, client, agent, agent_grpc, rt_agent,
                                                         metrics)):
        worker_lo = random.randrange(30000, 60000, 100)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_agent}",
           f"--metrics-export-port={metrics}", f"--min-worker-port={worker_lo}",
           f"--max-worker-port={worker_lo + 99}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--num-cpus=3", "--disable-usage-stats"]
    log = open(tmp_path / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{address}/api/version", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "ray start exited early: " + (tmp_path / "ray-start.log").read_text()[-2000:]
            assert time.time() < deadline, "the Ray job server did not come up in 120 s"
            time.sleep(0.5)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_head_starts_on_a_machine_that_never_ran_ray(tmp_path, fresh_home, head_env):
    """`make test` on a fresh machine: token auth works without ~/.ray, and nothing is written to home."""
    import httpx

    gen = _start_head(tmp_path, head_env)
    address = next(gen)
    try:
        assert httpx.get(f"{address}/api/version", timeout=5).status_code == 401  # auth is on
        ok = httpx.get(f"{address}/api/version", timeout=5,
                       headers={"Authorization": f"Bearer {head_env['RAY_AUTH_TOKEN']}"})
        assert ok.status_code == 200, ok.text
    finally:
        gen.close()
    assert list(fresh_home.iterdir()) == []


def test_ray_job_submit_then_herd_resubmit_resumes(ray_head, head_env, fresh_home, maverick_tiny, tmp_path, capsys):
    rows = write_rows(tmp_path / "facts.jsonl")
    storage = tmp_path / "runs"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict("submitted", str(maverick_tiny), str(rows), str(storage),
                                                steps=6, every=3)))
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
                        "--", "python", "-m", "finetune", str(job_file)],
                       env=head_env, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:] + "\nray start said:\n" + (tmp_path / "ray-start.log").read_text()[-2000:]
    assert "succeeded" in log.lower(), log[-3000:]
    assert "[finetune] step 6/6 loss" in log and "tokens/s" in log and "eta" in log
    first = json.loads((storage / "submitted" / "output" / "metrics.json").read_text())
    assert first["steps"] == 6 and first["resumed_at"] == []

    # Same name, more steps, through herd's own submit command: picks up at step 6.
    job_file.write_text(yaml.safe_dump(job_dict("submitted", str(maverick_tiny), str(rows), str(storage),
                                                steps=9, every=3)))
    from herd.cli import main

    assert main(["finetune", "submit", str(job_file), "--address", ray_head]) == 0
    out = capsys.readouterr().out
    assert "resumed from the checkpoint at step 6" in out
    second = json.loads((storage / "submitted" / "output" / "metrics.json").read_text())
    assert second["steps"] == 9 and second["resumed_at"] == [6]
    assert second["history"][:6] == first["history"]
    assert list(fresh_home.iterdir()) == []  # nothing written to the user's home

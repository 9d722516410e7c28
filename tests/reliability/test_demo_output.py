"""`make demo` reads as the demo's own steps (no pages of Ray INFO lines) and ends with a clean trained answer
(issue 16, item 5). Runs the real demo in a fresh folder, as a newcomer would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_the_demo_prints_its_steps_and_clean_trained_answers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HERD_DEMO_DIR": str(tmp_path / "herd-data"),
           "RAY_ADDRESS": ""}
    env.pop("HERD_LICENSING_KEY", None)
    env.pop("HERD_LICENSING_STORE", None)
    r = subprocess.run([sys.executable, "-m", "herd.demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    noise = [line for line in out.splitlines() if " INFO " in line or line.startswith("\x1b[36m(")
             or "(raylet)" in line or "Warning" in line]
    assert not noise, "\n".join(noise[:10])
    assert "\ufffd" not in "".join(line for line in out.splitlines() if "adapter merged" in line)
    assert "'What is herd?' -> 'herd runs Llama 4 on your own Ray cluster.' (the trained answer)" in out
    assert "(the trained answer)" in out and "trained on" not in out
    assert all(f"== {n}." in out for n in range(1, 7)) and "Built with Llama." in out

"""infra/'s example clusters: each plans as documented, and every rendered file is up to date with its source."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.planner import plan
from cluster.render_examples import EXAMPLES, render_example
from cluster.schema import load_cluster

REPO = Path(__file__).resolve().parents[2]

EXPECTED_FIT = {"local": True, "maverick-fp8-1x8": True, "maverick-bf16-2x8": True, "scout-int4-1gpu": True}


def test_every_example_cluster_plans_as_documented():
    files = sorted((REPO / "infra/clusters").glob("*.yaml"))
    assert {f.stem for f in files} == set(EXPECTED_FIT)
    for f in files:
        assert plan(load_cluster(f)).fits is EXPECTED_FIT[f.stem], f.name
    assert {src for src, *_ in EXAMPLES} == {f"infra/clusters/{f.name}" for f in files}


@pytest.mark.parametrize("source,target,out,job", EXAMPLES, ids=[e[2] for e in EXAMPLES])
def test_rendered_file_is_up_to_date(source, target, out, job):
    path = REPO / out
    assert path.is_file(), f"{out} is missing; run: python -m cluster.render_examples"
    assert path.read_text(encoding="utf-8") == render_example(source, target, job), (
        f"{out} is out of date with {source}; run: python -m cluster.render_examples")


def test_dockerfile_copies_every_package_the_wheel_includes():
    import re
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = set(re.findall(r"^COPY --chown=ray:users (\w+) \./\1$", (REPO / "infra/Dockerfile").read_text(), re.M))
    assert copied == packages


def test_readme_shows_the_real_plan_output(capsys, monkeypatch):
    """The ops section's `herd plan` block is what herd prints today (its placement list abridged with '...')."""
    from herd.cli import main

    monkeypatch.chdir(REPO)  # the README shows the path relative to the repository
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    cmd = "$ herd plan infra/clusters/maverick-bf16-2x8.yaml --throughput 5000\n"
    block = readme[readme.index(cmd) + len(cmd):].split("```", 1)[0].rstrip("\n").splitlines()
    assert main(["plan", "infra/clusters/maverick-bf16-2x8.yaml", "--throughput", "5000"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").splitlines()
    assert [line for line in block if line != "  ..."] == [line for line in printed if line in block]
    assert len(block) > 20


def test_no_orphan_rendered_files_and_the_check_command_agrees():
    from cluster.render_examples import main

    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "infra/rendered").rglob("*") if p.is_file()}
    assert on_disk == {out for _, _, out, _ in EXAMPLES}
    assert main(["--check"]) == 0

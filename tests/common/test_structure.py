"""The package layering: no library imports the `herd` command line, and `common` imports no area."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("common", "llama4", "cluster", "serving", "finetune", "licensing")
AREAS = ("herd", "llama4", "cluster", "serving", "finetune", "licensing")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file, including those inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def _modules(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    return files


@pytest.mark.parametrize("package", LIBRARIES)
def test_no_library_module_imports_herd(package):
    bad = [f"{f.relative_to(REPO)}:{line}" for f in _modules(package) for line, top in _imports(f) if top == "herd"]
    assert not bad, f"library modules import the herd command line (import common.errors instead): {bad}"


def test_common_imports_no_area():
    bad = [f"{f.relative_to(REPO)}:{line} imports {top}" for f in _modules("common") for line, top in _imports(f)
           if top in AREAS]
    assert not bad, bad


def test_the_command_line_catches_the_type_every_area_raises():
    from common.errors import ClusterFileError, JobFileError, UserError
    from herd.errors import UserError as CliUserError

    assert CliUserError is UserError
    assert issubclass(ClusterFileError, UserError) and issubclass(JobFileError, UserError)

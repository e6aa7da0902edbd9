"""The toolkit knows the gateway only through `sovereign_gateway.contract`, and the gateway,
its tests included, imports nothing of the toolkit: import-linter's contracts in
pyproject.toml hold on the tree, and they do fail on a crossing."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# The contracts' names in pyproject.toml.
TOOLKIT = "the toolkit imports only the gateway's contract"
GATEWAY = "the gateway imports nothing of the toolkit"
CONTRACT = "the contract imports nothing else of the gateway"


def _lint(cwd: Path, config: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": path} if path else None
    return subprocess.run(
        [str(LINT_IMPORTS), str(config), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=environment,
    )


def test_the_tree_keeps_every_import_contract() -> None:
    result = _lint(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("sovereign/cli/memory.py", "import sovereign_gateway.memory.service", TOOLKIT),
        ("sovereign_gateway/app.py", "from sovereign.cli import memory", GATEWAY),
        ("sovereign_gateway/contract.py", "import sovereign_gateway.audit", CONTRACT),
    ],
)
def test_a_new_crossing_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    for package in ("sovereign/cli", "sovereign_gateway/memory"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    for name in (
        "sovereign/__init__.py", "sovereign/cli/__init__.py", "sovereign/cli/memory.py",
        "sovereign/render.py", "sovereign_gateway/__init__.py", "sovereign_gateway/app.py",
        "sovereign_gateway/audit.py", "sovereign_gateway/contract.py",
        "sovereign_gateway/memory/__init__.py", "sovereign_gateway/memory/service.py",
    ):  # fmt: skip
        (tmp_path / name).write_text("")
    (tmp_path / "sovereign/render.py").write_text("import sovereign_gateway.contract\n")
    (tmp_path / module).write_text(f"{line}\n")
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = _lint(tmp_path, tmp_path / "pyproject.toml", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 kept, 1 broken" in result.stdout
    assert f"{broken} BROKEN" in result.stdout


def test_the_gateways_tests_import_nothing_of_the_toolkit() -> None:
    crossings = []
    for path in sorted((ROOT / "services" / "gateway" / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            crossings += [
                f"{path.relative_to(ROOT)}: {name}"
                for name in names
                if name == "sovereign" or name.startswith("sovereign.")
            ]
    assert crossings == []

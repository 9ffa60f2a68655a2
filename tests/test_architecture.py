"""The package's shape is checked, not just described: the import rules between stages
(import-linter contracts in pyproject.toml), a docstring on every stage saying what it does and
may import, and no module named like a standard-library one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"
STAGES = ("model", "dsl", "rules", "otlp", "stores", "signaldb", "routing", "ui", "live", "replay", "k8s")


def test_the_import_rules_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=PACKAGE.parent, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_says_what_it_does_and_may_import(stage: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
    assert doc and "import" in doc.lower(), f"sidecar/{stage}/__init__.py needs a docstring saying " \
        "what the stage does and what it may import"


def test_no_module_is_named_like_a_standard_library_one() -> None:
    clashes = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                     if path.stem in sys.stdlib_module_names)
    assert clashes == []

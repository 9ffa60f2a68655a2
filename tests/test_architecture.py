"""The package's shape is checked, not just described: the import rules between stages
(import-linter contracts in pyproject.toml), a docstring on every stage saying what it does and
may import, and no module named like a standard-library one."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
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


def test_the_wheel_ships_every_data_file(tmp_path: Path) -> None:
    """What the container image installs (a wheel, not this checkout) holds every file the
    package reads at run time: the grammar, the Lua scripts, the signal database's migrations,
    the explorer's templates and stylesheet, and the two compiled extensions. Built from the
    tracked files alone, as a clean clone would (a checkout's egg-info would list them whatever
    pyproject.toml says)."""
    root = PACKAGE.parent
    tracked = subprocess.run(["git", "ls-files", "sidecar", "pyproject.toml", "README.md"],
                             cwd=root, capture_output=True, text=True, timeout=30,
                             check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, source / name)
    data = {name for name in tracked
            if name.startswith("sidecar/") and not name.endswith((".py", ".pyi"))}
    assert {"sidecar/dsl/grammar.lark", "sidecar/ui/templates/base.html"} <= data
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(source)], capture_output=True, text=True,
        timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("betrace-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    assert data - shipped - {"sidecar/otlp/_wire.c", "sidecar/replay/_spill.c"} == set()
    for extension in ("sidecar/otlp/_wire.", "sidecar/replay/_spill."):
        assert any(name.startswith(extension) and name.endswith(".so") for name in shipped)

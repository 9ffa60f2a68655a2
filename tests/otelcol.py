"""The real OpenTelemetry Collector and Jaeger for tests: `built("otelcol")` / `built("jaeger")`
runs deploy/build.sh, which builds the pinned program once into the user cache
(~/.cache/betrace/NAME-<go.sum hash>/NAME) and prints its path.

In CI (CI=true) a missing Go or a failed build fails the test; elsewhere a missing Go skips it
with the reason (a failed build always fails)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "deploy" / "build.sh"
BUILD_TIMEOUT = 1500.0  # a cold build with an empty module cache took ~5 min here (2 cores)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@functools.cache
def _build(name: str) -> Path:
    result = subprocess.run(["bash", str(BUILD), name], cwd=REPO, capture_output=True,
                            text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"deploy/build.sh {name} exited {result.returncode}:\n"
                           f"{result.stderr[-4000:]}")
    path = Path(result.stdout.strip().splitlines()[-1])
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"deploy/build.sh {name} printed {path}, which is not executable")
    return path


def built(name: str) -> Path:
    """The path of the cached binary NAME (otelcol or jaeger), building it if the cache is cold."""
    if shutil.which("go") is None and not in_ci():
        pytest.skip(f"Go is not installed: the {name} binary is built from deploy/{name} with "
                    "Go 1.26+ (CI fails instead of skipping)")
    try:
        return _build(name)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        pytest.fail(str(error), pytrace=False)

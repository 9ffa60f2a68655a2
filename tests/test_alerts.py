"""The Prometheus alert rules (helm/betrace/files/alerts.yaml) are valid and behave as their
promtool unit tests (tests/promtool/alerts_test.yaml) say: each alert fires, and stays quiet, when
it should, with its exact labels and annotations.

Needs `promtool` on PATH. In CI (CI=true) a missing promtool fails the test: `.ci/run` installs
Debian's `prometheus` package, which provides /usr/bin/promtool.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from processes import missing

REPO = Path(__file__).resolve().parent.parent
ALERTS = "helm/betrace/files/alerts.yaml"
ALERT_TESTS = "tests/promtool/alerts_test.yaml"


def _promtool() -> str:
    """promtool's path; a missing one fails the test in CI (not an error, not a skip)."""
    path = shutil.which("promtool")
    if path is None:
        missing("promtool", "prometheus")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_alert_rules_are_valid() -> None:
    result = _run(_promtool(), "check", "rules", ALERTS)
    assert result.returncode == 0, f"promtool check rules failed:\n{result.stdout}{result.stderr}"
    assert "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_alert_rules_unit_tests() -> None:
    result = _run(_promtool(), "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}{result.stderr}"
    assert "SUCCESS" in result.stdout, result.stdout + result.stderr

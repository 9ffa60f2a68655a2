"""Run a rule someone is writing over a sample, away from every running sidecar: checked here
(errors with their caret), then replayed by `betrace replay` in a child process, bounded in
input size and time, so a slow rule or a huge sample never holds the page's server."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.model.errors import RuleLoadError
from sidecar.rules import load_rules_text

MAX_RULE_BYTES = 64 * 1024
MAX_SAMPLE_BYTES = 16 * 2**20  # an uploaded OTLP JSON file
TIMEOUT = 30.0  # seconds for one replay
MAX_SHOWN = 200  # violations listed on the page


@dataclass
class Outcome:
    errors: list[str] = field(default_factory=list)  # `betrace check`'s, each with its caret
    signals: list[dict[str, Any]] = field(default_factory=list)  # the violations found
    summary: list[str] = field(default_factory=list)  # replay's per-rule lines
    failure: str = ""  # the replay timed out or could not run

    @property
    def more(self) -> int:
        return max(0, len(self.signals) - MAX_SHOWN)


def run(rule_text: str, sample: Path) -> Outcome:
    """Check `rule_text` (a rule file's YAML); if it loads, replay it over `sample`."""
    if len(rule_text.encode()) > MAX_RULE_BYTES:
        return Outcome(errors=[f"the rules are over {MAX_RULE_BYTES // 1024} KiB"])
    try:
        load_rules_text(rule_text, "playground.yaml")
    except RuleLoadError as exc:
        return Outcome(errors=[str(error) for error in exc.errors])
    with tempfile.TemporaryDirectory(prefix="betrace-playground-") as tmp:
        rules = Path(tmp) / "playground.yaml"
        rules.write_text(rule_text, encoding="utf-8")
        try:
            done = subprocess.run(
                [sys.executable, "-m", "sidecar", "replay", "--rules", str(rules), "--format",
                 "jsonl", "--progress", "never", "--jobs", "1", str(sample)],
                capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp)
        except subprocess.TimeoutExpired:
            return Outcome(failure=f"the replay took longer than {TIMEOUT:g} s and was stopped")
    lines = done.stderr.splitlines()
    outcome = Outcome(summary=[line.strip() for line in lines
                               if line.startswith(("replayed ", "  "))])
    outcome.signals = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if done.returncode not in (0, 1, 3, 4):  # 2: it could not run
        outcome.failure = "\n".join(line for line in lines if line.startswith("betrace:")) \
            or done.stderr.strip()[-2000:]
    return outcome

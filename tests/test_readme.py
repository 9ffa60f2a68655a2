"""The README's quickstart stays true: its rule file checks and passes its examples, and its
OTLP JSON request, replayed with it, gives the signal the README shows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def quickstart_blocks() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart"):text.index("## The live sidecar")]
    rule = re.search(r"```yaml\n(.*?)```", section, re.S)
    request = re.search(r"```json\n(\{\"resourceSpans\".*?)```", section, re.S)
    assert rule and request
    return rule.group(1), request.group(1)


def betrace(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_quickstart_rule_checks_passes_and_finds_the_order_without_email(
        tmp_path: Path) -> None:
    rule, request = quickstart_blocks()
    rules = tmp_path / "my-rules"
    rules.mkdir()
    (rules / "orders.yaml").write_text(rule)
    checked = betrace("check", rules)
    assert checked.returncode == 0 and checked.stdout.startswith("ok: 1 rule(s)"), checked
    tested = betrace("test", rules)
    assert tested.returncode == 0 and "PASS  order-confirmation-email (2/2 examples)" in \
        tested.stdout, tested
    traces = tmp_path / "order.json"
    traces.write_text(json.dumps(json.loads(request)) + "\n")
    replayed = betrace("replay", "--rules", rules, traces)
    [signal] = [json.loads(line) for line in replayed.stdout.splitlines()]
    assert (signal["rule_id"], signal["span_ids"], signal["context"]) == (
        "order-confirmation-email", ["0000000000000002"], {"order_id": "o-2"})


def test_the_investigation_shown_is_what_betrace_signals_prints(tmp_path: Path) -> None:
    """Every `$ betrace signals ...` of the README's signal database section, run against a
    database the README's replay filled, prints what the README shows (detection times, which
    are the replay's own clock, aside)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Signals: the database"):text.index("## The catalog")]
    block = re.search(r"```\n(\$ betrace signals.*?)```", section, re.S)
    assert block
    db = f"sqlite:///{tmp_path}/signals.db"
    replayed = betrace("replay", "--rules", "rules/", "--signals-db", db, "--progress", "never",
                       "rules/samples/incidents.otlp.jsonl")
    assert replayed.returncode == 0, replayed.stderr
    runs = re.findall(r"^\$ betrace (signals .*)\n((?:(?!\$ ).*\n)*)", block.group(1), re.M)
    assert len(runs) == 3
    clock = re.compile(r"2026-12-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")  # when the replay ran
    for command, shown in runs:
        args = command.replace("sqlite:///signals.db", db).split()
        printed = betrace(*args)
        assert printed.returncode == 0, printed.stderr
        assert clock.sub("T", printed.stdout).strip() == clock.sub("T", shown).strip(), command

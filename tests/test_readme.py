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

"""The reload thread: whatever a reload raises, it refuses that reload and goes on watching."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.live.metrics import Metrics
from sidecar.live.reload import RuleWatcher
from sidecar.rules import RuleSet, load_rules

RULE = """
rules:
  - id: {id}
    condition: count(refund.issued) > 0
"""
DISABLED = """\
  - id: dormant
    enabled: false
    when: a.where(x == 1)
    never: b
"""


def test_the_reload_thread_survives_a_failing_swap_and_applies_the_next_change(
        tmp_path: Path, wait_until: Callable[..., Any]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(id="first"))
    applied: list[str] = []

    def apply(ruleset: RuleSet) -> None:
        if not applied:
            applied.append("refused")
            raise RuntimeError("the swap failed")  # e.g. a bug in building the projection
        applied.append(ruleset.rules[0].id)

    metrics = Metrics()
    watcher = RuleWatcher([str(rules)], load_rules([str(rules)]), apply, metrics, interval=0.02)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        rules.write_text(RULE.format(id="second"))
        watcher.poke()
        wait_until(lambda: applied == ["refused"], what="the failing swap")
        sample = metrics.registry.get_sample_value
        checked = sample("betrace_rule_reload_last_check_timestamp_seconds")
        wait_until(lambda: sample("betrace_rule_reload_last_check_timestamp_seconds") > checked,
                   what="the thread still watching")
        assert sample("betrace_rule_reload_failures_total") == 1
        rules.write_text(RULE.format(id="third"))
        watcher.poke()
        wait_until(lambda: applied == ["refused", "third"], what="the next change")
        assert thread.is_alive()
    finally:
        stop.set()
        watcher.poke()
        thread.join(5)


def test_each_reload_logs_its_rules_and_the_first_good_one_after_failures_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.live.reload")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(id="first"))
    metrics = Metrics()
    watcher = RuleWatcher([str(rules)], load_rules([str(rules)]), lambda ruleset: None,
                          metrics, interval=3600)

    def logged() -> list[str]:
        messages = [record.getMessage() for record in caplog.records]
        caplog.clear()
        return messages

    rules.write_text(RULE.format(id="second") + DISABLED)
    assert watcher.reload()
    reloaded, *listed = logged()
    assert reloaded.startswith("rules reloaded: 1 enabled rule(s) from 1 file(s)")
    assert listed == [
        f"rule second severity=medium enabled=yes form=condition on_arrival=yes "
        f"fires_without_its_spans=no at={rules}:3 reads=refund.issued",
        f"rule dormant severity=medium enabled=no form=when+never on_arrival=yes "
        f"fires_without_its_spans=no at={rules}:5 reads=a(x) b",
    ]

    before = time.time()
    for broken in ("> > 0", "> >= 0"):
        rules.write_text(RULE.format(id="third").replace("> 0", broken))
        assert not watcher.reload()
    assert all(r.levelno == logging.ERROR and "rule reload failed" in r.getMessage()
               for r in caplog.records) and len(caplog.records) == 2
    caplog.clear()
    rules.write_text(RULE.format(id="third"))
    assert watcher.reload()
    good, reloaded, listed_rule = logged()
    found = re.fullmatch(r"rules are good again after 2 failed reload\(s\), failing since "
                         r"(\S+)", good)
    assert found, good
    since = datetime.fromisoformat(found[1].replace("Z", "+00:00")).timestamp()
    assert before - 1 <= since <= time.time()
    assert reloaded.startswith("rules reloaded: ")
    assert listed_rule.startswith("rule third severity=medium enabled=yes ")

    # good again with the very rules loaded before: said so, and nothing is reloaded
    rules.write_text("rules: [\n")
    assert not watcher.reload()
    caplog.clear()
    rules.write_text(RULE.format(id="third"))
    assert not watcher.reload()
    [good] = logged()
    assert good.startswith("rules are good again after 1 failed reload(s), failing since ")
    assert good.endswith("; they are the rules loaded before, unchanged")
    assert not watcher.reload()
    assert logged() == []
    assert metrics.registry.get_sample_value("betrace_rule_reload_failures_total") == 3

"""The reload thread: whatever a reload raises, it refuses that reload and goes on watching."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.live.metrics import Metrics
from sidecar.live.reload import RuleWatcher
from sidecar.rules import RuleSet, load_rules

RULE = """
rules:
  - id: {id}
    condition: count(refund.issued) > 0
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

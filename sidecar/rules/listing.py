"""What each loaded rule is and reads, for `betrace rules` and the live sidecar's log: one
summary per rule, as JSON, as an aligned table, or as greppable `rule <id> key=value` lines."""

from __future__ import annotations

import json
import re
from typing import Any

from sidecar.rules.ruleset import Rule, RuleSet

# the summary's text fields, in order, with their table headers
COLUMNS = {"id": "RULE", "severity": "SEVERITY", "enabled": "ENABLED", "form": "FORM",
           "on_arrival": "ARRIVAL", "fires_without_its_spans": "EMPTY", "at": "AT",
           "reads": "READS"}
MIN_READS_WIDTH = 30  # a cut `reads` keeps at least this much, however wide the other cells
_PLAIN_SELECTOR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def listed(ruleset: RuleSet) -> list[Rule]:
    """Every rule, disabled ones too, in the order the files define them."""
    order = {file: index for index, file in enumerate(ruleset.files)}
    return sorted(ruleset.rules + ruleset.disabled,
                  key=lambda r: (order.get(r.location.file, len(order)), r.location.line))


def describe(rule: Rule) -> dict[str, Any]:
    """A rule's summary (the JSON object `betrace rules --format json` lists): `reads` holds
    each span selector with the attributes the rule reads on the spans it selects."""
    return {
        "id": rule.id,
        "severity": rule.severity,
        "enabled": rule.enabled,
        "file": rule.location.file,
        "line": rule.location.line,
        "form": rule.form,
        "reads": [{"span": span, "glob": glob, "attributes": sorted(attributes)}
                  for (span, glob), attributes in sorted(_by_selector(rule).items())],
        "on_arrival": rule.logic.monotone,
        "fires_without_its_spans": rule.fires_without_its_spans,
    }


def summary_text(rule: Rule) -> dict[str, str]:
    """The summary as the text fields (keys of COLUMNS) that the table and the log both show:
    `reads` is compact, `payment.charge(attempt,payment_intent_id) "http.*"(status)`."""
    summary = describe(rule)
    reads = " ".join(_selector(r["span"], r["glob"])
                     + (f"({','.join(r['attributes'])})" if r["attributes"] else "")
                     for r in summary["reads"])
    return {"id": rule.id, "severity": rule.severity, "enabled": _yes(rule.enabled),
            "form": rule.form, "on_arrival": _yes(summary["on_arrival"]),
            "fires_without_its_spans": _yes(summary["fires_without_its_spans"]),
            "at": f"{summary['file']}:{summary['line']}", "reads": reads or "-"}


def as_json(ruleset: RuleSet) -> str:
    return json.dumps({"rules": [describe(rule) for rule in listed(ruleset)],
                       "digest": ruleset.digest}, indent=2)


def table(ruleset: RuleSet, width: int) -> list[str]:
    """A header and one line per rule, columns aligned; `reads`, last, is cut with `…` where the
    line would pass `width` (the JSON has it whole)."""
    rows = [list(COLUMNS.values())] + [[text[key] for key in COLUMNS]
                                       for text in map(summary_text, listed(ruleset))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    room = max(width - sum(widths) - 2 * len(widths), MIN_READS_WIDTH)
    lines = []
    for row in rows:
        reads = row[-1] if len(row[-1]) <= room else row[-1][:room - 1] + "…"
        lines.append("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [reads]).rstrip())
    return lines


def log_lines(ruleset: RuleSet) -> list[str]:
    """One line per rule, `rule <id> severity=... reads=...`, so `grep 'rule <id> '` finds it."""
    return [f"rule {text['id']} " + " ".join(f"{key}={text[key]}" for key in COLUMNS
                                             if key != "id")
            for text in map(summary_text, listed(ruleset))]


def _selector(span: str, glob: bool) -> str:
    """As the rule language spells it: a glob, or a name that is not dotted words, is quoted."""
    return span if not glob and _PLAIN_SELECTOR.fullmatch(span) else json.dumps(span)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _by_selector(rule: Rule) -> dict[tuple[str, bool], set[str]]:
    """Each selector once, with every attribute read on its spans (a rule may select the same
    spans in several places: the for_each span, and the same name inside its clauses)."""
    merged: dict[tuple[str, bool], set[str]] = {}
    for span, glob, attributes in rule.logic.refs.selectors:
        merged.setdefault((span, glob), set()).update(attributes)
    return merged

"""`betrace signals` output: stored signals, or their groups, as an aligned table, CSV (one
`context.<attr>` column per attribute found, for the support team's list) or JSON lines."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from typing import IO

from sidecar.model.signal_writers import cell, write_aligned
from sidecar.signaldb.query import Group, StoredSignal

FORMATS = ("table", "csv", "jsonl")
_CSV_FIELDS = ("signal_id", "rule_id", "severity", "trace_id", "service", "service_version",
               "violation_time", "detected_at", "last_seen", "mode", "modes", "rule_digest",
               "span_ids", "message")


def write_signals(rows: Iterable[StoredSignal], fmt: str, out: IO[str],
                  context_keys: Sequence[str] = ()) -> int:
    """Write the rows (as they come, but for the table); returns how many. CSV has a
    `context.<key>` column per one of `context_keys`."""
    count = 0
    if fmt == "jsonl":
        for count, row in enumerate(rows, 1):
            out.write(json.dumps(row.as_dict(), ensure_ascii=False, default=str) + "\n")
    elif fmt == "csv":
        keys = list(context_keys)
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*_CSV_FIELDS, *(f"context.{key}" for key in keys)])
        for count, row in enumerate(rows, 1):
            fields = row.as_dict()
            writer.writerow([*(cell(fields[f]) for f in _CSV_FIELDS),
                             *(cell(row.context.get(key)) for key in keys)])
    else:
        rows = list(rows)  # (aligned to the widest value: every row first)
        count = len(rows)
        write_aligned(
            ["WHEN", "SEVERITY", "RULE", "SERVICE", "VERSION", "TRACE", "CONTEXT"],
            [[row.occurred_at, row.severity, row.rule_id, row.service or "",
              row.service_version or "", row.trace_id,
              " ".join(f"{k}={cell(v)}" for k, v in row.context.items() if v is not None)]
             for row in rows], out)
    out.flush()
    return count


def write_groups(groups: Sequence[Group], by: str, fmt: str, out: IO[str]) -> None:
    if fmt == "jsonl":
        for group in groups:
            out.write(json.dumps({by: group.value, "count": group.count, "first": group.first,
                                  "last": group.last}, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([by, "count", "first", "last"])
        for group in groups:
            writer.writerow([cell(group.value), group.count, group.first, group.last])
    else:
        write_aligned([by.upper(), "COUNT", "FIRST", "LAST"],
                      [[cell(g.value) if g.value is not None else "(none)", str(g.count), g.first,
                 g.last] for g in groups], out)
    out.flush()

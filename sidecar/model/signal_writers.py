"""Where signals go: JSON lines (the signal log), CSV (for the support team's refund list), or an
aligned table for a terminal. Every writer takes signals one at a time and is closed once."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import IO, Any, Protocol

from sidecar.model.signals import Signal

FORMATS = ("jsonl", "csv", "table")
_CSV_FIELDS = ("signal_id", "rule_id", "rule_name", "severity", "trace_id", "span_ids",
               "message", "mode", "detected_at", "violation_time", "service", "service_version",
               "rule_digest")


class SignalWriter(Protocol):
    def write(self, signal: Signal) -> None: ...
    def close(self) -> None: ...


class JsonLinesWriter:
    """One JSON object per line, flushed per signal so a tailing reader sees it at once."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, signal: Signal) -> None:
        self.out.write(json.dumps(signal.as_dict(), ensure_ascii=False, default=str) + "\n")
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


class CsvWriter:
    """A header of the signal fields plus one `context.<attr>` column per declared attribute;
    several values of one attribute are joined with '|'."""

    def __init__(self, out: IO[str], context_columns: Sequence[str]) -> None:
        self.context_columns = list(context_columns)
        self.writer = csv.writer(out, lineterminator="\n")
        self.writer.writerow([*_CSV_FIELDS, *(f"context.{c}" for c in self.context_columns)])
        self.out = out

    def write(self, signal: Signal) -> None:
        row = signal.as_dict()
        row["span_ids"] = " ".join(signal.span_ids)
        self.writer.writerow([*(cell(row[f]) for f in _CSV_FIELDS),
                              *(cell(signal.context.get(c)) for c in self.context_columns)])

    def close(self) -> None:
        self.out.flush()


class TableWriter:
    """Columns aligned to the widest value, so it is written once all signals are in."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.rows: list[list[str]] = []

    def write(self, signal: Signal) -> None:
        context = " ".join(f"{k}={cell(v)}" for k, v in signal.context.items() if v is not None)
        self.rows.append([signal.severity, signal.rule_id, signal.trace_id,
                          signal.violation_time or "", context])

    def close(self) -> None:
        write_aligned(["SEVERITY", "RULE", "TRACE", "WHEN", "CONTEXT"], self.rows, self.out)
        self.out.flush()


def write_aligned(header: list[str], rows: list[list[str]], out: IO[str]) -> None:
    """Columns aligned to the widest value; the last one is left ragged."""
    everything = [header, *rows]
    widths = [max(len(r[i]) for r in everything) for i in range(len(header) - 1)]
    for row in everything:
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        out.write("  ".join(cells).rstrip() + "\n")


def make_writer(fmt: str, out: IO[str], context_columns: Sequence[str] = ()) -> SignalWriter:
    if fmt == "jsonl":
        return JsonLinesWriter(out)
    if fmt == "csv":
        return CsvWriter(out, context_columns)
    if fmt == "table":
        return TableWriter(out)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def cell(value: Any) -> str:
    """A value as one CSV or table cell: lists joined with '|', booleans lower case."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(cell(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

"""What an investigator asks of the signal database: filters, a grouping, and the rows that
come back. Shared by both databases and by `betrace signals`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# What --group-by and the filters accept besides context attributes, and their columns.
COLUMNS = {
    "rule": "rule_id", "rule_id": "rule_id", "rule_name": "rule_name", "severity": "severity",
    "service": "service", "service.name": "service", "service.version": "service_version",
    "mode": "mode", "trace_id": "trace_id", "rule_digest": "rule_digest",
    "signal_id": "signal_id",
}


@dataclass(frozen=True)
class SignalQuery:
    """Every filter is optional; several values of one filter match any of them, different
    filters must all match. `since`/`until` bound `occurred_at` (the violation's time, else
    its detection), as RFC 3339 UTC text; `where` matches context attributes by their text
    (for a list, any element)."""

    rules: tuple[str, ...] = ()
    severities: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    since: str | None = None
    until: str | None = None
    where: tuple[tuple[str, str], ...] = ()
    limit: int | None = None
    offset: int = 0  # rows skipped (newest first): a page


@dataclass(frozen=True)
class StoredSignal:
    """One row: the signal as first detected, and what later detections added."""

    signal_id: str
    rule_id: str
    rule_name: str
    rule_digest: str | None
    severity: str
    trace_id: str
    span_ids: list[str]
    message: str
    context: dict[str, Any]
    service: str | None
    service_version: str | None
    mode: str
    modes: tuple[str, ...]
    detected_at: str
    last_seen: str
    violation_time: str | None
    occurred_at: str = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["modes"] = list(self.modes)
        del out["occurred_at"]
        return out


@dataclass(frozen=True)
class Group:
    """Signals sharing one value of the grouping attribute (None: rows without it)."""

    value: Any
    count: int
    first: str  # earliest occurred_at
    last: str  # latest occurred_at

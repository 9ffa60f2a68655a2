"""Signals: what a violation becomes once detected, in the JSON-lines shape of the signal log.

`signal_id` is derived from the rule id and the trace id alone, so the same violation found by
two sidecars, or by two replays, carries the same id and can be deduplicated downstream.
"""

from __future__ import annotations

import datetime
import json
import uuid
from dataclasses import dataclass
from typing import Any

_SIGNAL_NAMESPACE = uuid.UUID("5b1f2a4e-6c0d-4f57-9a3e-be7ace000001")
MAX_VALUE_BYTES = 4096  # of one context value in a signal (a violation span's attribute too)


def capped(value: Any, limit: int = MAX_VALUE_BYTES) -> Any:
    """A context value fit for a signal: a string, or the JSON text of a list or map, longer
    than `limit` UTF-8 bytes is cut there, with a marker that says so and how long it was.
    Rules always see the whole value; only what a sink writes is cut (a 10 MB attribute made
    a 10 MB log line)."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                          default=str)
    data = text.encode()
    if len(data) <= limit:
        return value
    return (data[:limit].decode(errors="ignore")
            + f"...[cut at {limit} of {len(data)} bytes]")


def signal_id(rule_id: str, trace_id: str) -> str:
    return str(uuid.uuid5(_SIGNAL_NAMESPACE, f"{rule_id}/{trace_id}"))


def trace_link(template: str, trace_id: str) -> str:
    """A --trace-url template with `{trace_id}` filled in (no other braces are touched: URLs
    hold them)."""
    return template.replace("{trace_id}", trace_id)


def trace_url_problem(template: str) -> str | None:
    """What is wrong with a --trace-url template, or None."""
    return None if "{trace_id}" in template else f"{template!r} has no {{trace_id}} to fill in"


def rfc3339(unix_ns: int) -> str:
    """UTC timestamp with millisecond precision, as logs and CSV readers expect."""
    moment = datetime.datetime.fromtimestamp(unix_ns / 1e9, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Signal:
    signal_id: str
    rule_id: str
    rule_name: str
    severity: str
    trace_id: str
    span_ids: list[str]
    message: str
    context: dict[str, Any]
    mode: str
    detected_at: str
    violation_time: str | None  # start of the latest offending span: when it happened
    service: str | None  # that span's resource service.name (None without offending spans)
    service_version: str | None  # and its resource service.version: which deploy did it
    rule_digest: str | None = None  # Rule.digest: which version of the rule found it

    def as_dict(self) -> dict[str, Any]:
        """The fields in order, shallow (dataclasses.asdict deep-copies every context value:
        a third of the signal log's cost)."""
        return dict(vars(self))

"""The compact span form used by rule examples and test files, turned into real spans.

    spans:
      - {name: payment.charge, attributes: {attempt: 2}, service: checkout, status: ERROR,
         kind: SERVER, start_ms: 10, duration_ms: 250, span_id: "00000000000000aa",
         parent: "00000000000000a1"}
      - {name: payment.refund, resource: {service.name: checkout}}

All spans of a list are one trace. `start_ms` defaults to the span's index, so listing order is
start order; `duration_ms` defaults to 1; `span_id` to the span's position (1, 2, ... in 16 hex
digits); `parent` (a span id, 16 hex digits) makes it a child of that span. YAML types map to OTLP types (a list is an array).
`resource` holds the span's resource attributes as an exporter sends them; rules and signals
read only `service.name` there (DESIGN rule 8), so that is the one key it takes (`service` is
its shorthand).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import re
from typing import Any

from sidecar.model.spans import KINDS, STATUSES, Span, Trace

FIELDS = ("name", "attributes", "service", "resource", "status", "kind", "start_ms",
          "duration_ms", "span_id", "parent")
RESOURCE_KEYS = ("service.name",)  # the resource attributes rules and signals can read
_EPOCH_NS = 1_790_000_000_000_000_000  # 2026-09: example spans look like recent traffic
# start + duration stay within OTLP's fixed64 nanoseconds (and within a float's range)
_MAX_MS = (2**64 - 1 - _EPOCH_NS) // 2 // 1_000_000


class CompactSpanError(ValueError):
    """A compact span that cannot become a Span; `index` and `key` say where."""

    def __init__(self, message: str, index: int, key: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.key = key


def trace_from_compact(items: Any, seed: str = "") -> Trace:
    """Build one trace from a list of compact spans; the trace id is derived from `seed`."""
    trace_id = hashlib.sha256(f"betrace-example:{seed}".encode()).hexdigest()[:32]
    if not isinstance(items, list):
        raise CompactSpanError("spans must be a list of span mappings", 0)
    return Trace(trace_id, [_span(trace_id, i, item) for i, item in enumerate(items)])


def _span(trace_id: str, index: int, item: Any) -> Span:
    if not isinstance(item, dict):
        raise CompactSpanError(f"span {index + 1} must be a mapping such as "
                               "{name: payment.charge}", index)
    for key in item:
        if key not in FIELDS:
            raise CompactSpanError(f"span {index + 1}: unknown key {key!r}; expected one of "
                                   f"{', '.join(FIELDS)}", index, str(key))
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise CompactSpanError(f"span {index + 1}: 'name' is required and must be a string",
                               index, "name")
    status = item.get("status", "UNSET")
    if status not in STATUSES:
        raise CompactSpanError(f"span {index + 1}: status must be one of {', '.join(STATUSES)}",
                               index, "status")
    kind = item.get("kind", "INTERNAL")
    if kind not in KINDS:
        raise CompactSpanError(f"span {index + 1}: kind must be one of {', '.join(KINDS[1:])}",
                               index, "kind")
    start_ms = _number(item, "start_ms", index, default=index)
    duration_ms = _number(item, "duration_ms", index, default=1)
    attributes = item.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise CompactSpanError(f"span {index + 1}: attributes must be a mapping", index,
                               "attributes")
    service = _service(item, index)
    span_id = _span_id(item, "span_id", index) or f"{index + 1:016x}"
    start_ns = _EPOCH_NS + int(start_ms * 1_000_000)
    return Span(
        trace_id, span_id, name, parent_span_id=_span_id(item, "parent", index),
        start_ns=start_ns, end_ns=start_ns + int(duration_ms * 1_000_000),
        status=status, kind=kind, service=None if service is None else str(service),
        attributes={str(k): otlp_value(v) for k, v in attributes.items() if v is not None},
    )


def _service(item: dict[str, Any], index: int) -> Any:
    """`service`, or `resource: {service.name: ...}`: the one resource attribute a Span keeps."""
    resource = item.get("resource")
    if resource is None:
        return item.get("service")
    if not isinstance(resource, dict):
        raise CompactSpanError(f"span {index + 1}: resource must be a mapping such as "
                               "{service.name: checkout}", index, "resource")
    for key in resource:
        if key not in RESOURCE_KEYS:
            raise CompactSpanError(
                f"span {index + 1}: resource attribute {key!r} cannot be read by rules, which "
                f"see only {', '.join(RESOURCE_KEYS)} of a span's resource", index, "resource")
    if "service" in item and "service.name" in resource:
        raise CompactSpanError(f"span {index + 1}: give the service once, as 'service' or as "
                               "resource 'service.name'", index, "resource")
    return resource.get("service.name", item.get("service"))


def _span_id(item: dict[str, Any], key: str, index: int) -> str:
    """A span id as OTLP/JSON writes it (16 hex digits), lowercased; '' when not given."""
    value = item.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{16}", value):
        raise CompactSpanError(f"span {index + 1}: {key} must be a span id of 16 hex digits, "
                               'such as "00000000000000a1"', index, key)
    return value.lower()


def _number(item: dict[str, Any], key: str, index: int, default: float) -> float:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise CompactSpanError(f"span {index + 1}: {key} must be a non-negative number",
                               index, key)
    if value > _MAX_MS:
        raise CompactSpanError(f"span {index + 1}: {key} must be at most {_MAX_MS}", index, key)
    return value


def otlp_value(value: Any) -> Any:
    """YAML values as OTLP would carry them: lists become arrays, dates become strings."""
    if isinstance(value, list):
        return tuple(otlp_value(v) for v in value)
    if isinstance(value, dict):
        return {str(k): otlp_value(v) for k, v in value.items()}
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return value

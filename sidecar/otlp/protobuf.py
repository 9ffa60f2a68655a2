"""OTLP protobuf (ExportTraceServiceRequest) to span records, grouped by trace.

This is the live hot path: a span's name is read first and the span is skipped unless some rule
selects it; only the attributes rules read are decoded. BeTrace's own violation spans, coming
back through the collector, are recognised by their reserved name and skipped.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.model.names import VIOLATION_SPAN
from sidecar.otlp.decoded import Decoded
from sidecar.model.spans import KINDS, STATUSES, Projection, Span

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_NO_ATTRIBUTES: dict[str, Any] = {}  # shared by every span that keeps none: never mutated
_STATUS, _KIND = dict(enumerate(STATUSES)), dict(enumerate(KINDS))


def parse_request(body: bytes) -> ExportTraceServiceRequest:
    """Raise ValueError with a reason when the body is not an ExportTraceServiceRequest."""
    try:
        return ExportTraceServiceRequest.FromString(body)
    except DecodeError as exc:
        raise ValueError(f"not an OTLP ExportTraceServiceRequest: {exc}") from None


def decode_request(request: ExportTraceServiceRequest, projection: Projection) -> Decoded:
    out = Decoded()
    wants, keep_for = projection.wants_name, projection.attributes_for
    batch = out.batch
    hex_ids: dict[bytes, str] = {}  # one str per trace id, not one per span
    bare_ids: set[bytes] | None = set() if projection.trace_ids else None
    # per span name: the one str for it, and the attributes to keep (None: every one); a name
    # no rule selects maps to None
    names: dict[str, tuple[str, frozenset[str] | None] | None] = {}
    for resource_spans in request.resource_spans:
        service = None
        for kv in resource_spans.resource.attributes:
            if kv.key == "service.name":
                service = kv.value.string_value
                break
        for scope_spans in resource_spans.scope_spans:
            spans = scope_spans.spans
            out.received += len(spans)
            for span in spans:
                name = span.name
                try:
                    selected = names[name]
                except KeyError:
                    selected = names[name] = (name, keep_for(name)) \
                        if wants(name) and name != VIOLATION_SPAN else None
                if selected is None:
                    if name == VIOLATION_SPAN:
                        out.own += 1
                    else:
                        out.not_selected += 1
                        if bare_ids is not None and len(span.trace_id) == 16 \
                                and span.trace_id != _ZERO_TRACE:
                            bare_ids.add(span.trace_id)
                    continue
                trace_id, span_id = span.trace_id, span.span_id
                tid = hex_ids.get(trace_id)
                if tid is None:
                    if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
                        out.invalid.append(f"span {name!r}: invalid trace_id {trace_id.hex()!r}")
                        continue
                    tid = hex_ids[trace_id] = trace_id.hex()
                if len(span_id) != 8 or span_id == _ZERO_SPAN:
                    out.invalid.append(f"span {name!r}: invalid span_id {span_id.hex()!r}")
                    continue
                name, keep = selected
                if keep is None:
                    attributes = {kv.key: any_value(kv.value) for kv in span.attributes}
                elif keep:
                    attributes = _kept(span.attributes, keep)
                else:
                    attributes = _NO_ATTRIBUTES
                parent = span.parent_span_id
                record = Span.of(
                    tid, span_id.hex(), name, parent.hex() if parent != _ZERO_SPAN else "",
                    span.start_time_unix_nano, span.end_time_unix_nano,
                    _STATUS.get(span.status.code, "UNSET"), _KIND.get(span.kind, "UNSPECIFIED"),
                    service, attributes)
                bucket = batch.get(tid)
                if bucket is None:
                    batch[tid] = [record]
                else:
                    bucket.append(record)
    if bare_ids:
        out.bare_trace_ids = {trace_id.hex() for trace_id in bare_ids} - batch.keys()
    return out


def _kept(key_values: Any, keep: frozenset[str]) -> dict[str, Any]:
    """The wanted attributes; stop reading once all are found."""
    found: dict[str, Any] = {}
    wanted = len(keep)
    for kv in key_values:
        key = kv.key
        if key in keep:
            found[key] = any_value(kv.value)
            if len(found) == wanted:
                break
    return found


def any_value(value: Any) -> Any:
    """An AnyValue as the rule engine sees it (arrays as tuples, kvlists as dicts)."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "bool_value":
        return value.bool_value
    if which == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value
    return None

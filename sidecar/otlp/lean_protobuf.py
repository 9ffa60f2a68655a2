"""Replay's span record: what a kept span is reduced to, what decides which spans are kept, and
the fast path from OTLP protobuf bytes to records.

Spans become `Record` tuples, not `Span` objects: replay holds and spills millions of them, and a
tuple of str/int/dict is small and marshals fast. A span no rule selects is dropped on its name
alone, and a kept span decodes only the attributes its rules read (the `Projection`).
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import KINDS, STATUSES, Projection, Span
from sidecar.otlp.protobuf import any_value  # the live path's AnyValue conversion

# span_id, parent_span_id, name, start_ns, end_ns, status, kind, service (resource service.name),
# attributes, and the resource attribute named by --group-by (None without one)
Record = tuple[str, str, str, int, int, str, str, "str | None", dict[str, Any], Any]
Batch = dict[str, list[Record]]  # one request's kept records by trace id

_DOUBLE = struct.Struct("<d")
_NO_ATTRIBUTES: dict[str, Any] = {}  # shared by every record that keeps none: never mutated
_ZERO_TRACE, _ZERO_SPAN = bytes(16), bytes(8)
_KIND = dict(enumerate(KINDS))
# A Status is kept as bytes: without a message (the usual case) these are all it can be.
_STATUS_BYTES = {b"": "UNSET", b"\x18\x00": "UNSET", b"\x18\x01": "OK", b"\x18\x02": "ERROR"}


@dataclass(frozen=True)
class SpanFilter:
    """What to keep: spans the projection selects that start in [since_ns, until_ns), with the
    resource attribute `resource_key` carried on each record (for --group-by). `names`, when
    the selected span names are known exactly (no globs), lets the proto reader skip whole
    scopes that contain none of them without parsing."""

    projection: Projection
    since_ns: int = 0
    until_ns: int = 2**64
    resource_key: str | None = None
    names: frozenset[str] | None = None

    @classmethod
    def of(cls, projection: Projection, since_ns: int | None = None,
           until_ns: int | None = None, group_by: str | None = None,
           names: frozenset[str] | None = None) -> SpanFilter:
        """`projection` widened so every kept span keeps the `group_by` attribute too."""
        since, until = since_ns or 0, 2**64 if until_ns is None else until_ns
        if group_by is None:
            return cls(projection, since, until, None, names)
        inner, known = projection.attributes_for, {}

        def attributes_for(name: str) -> frozenset[str] | None:
            if name not in known:
                reads = inner(name)
                known[name] = None if reads is None else reads | {group_by}
            return known[name]
        attributes = None if projection.attributes is None else projection.attributes | {group_by}
        widened = Projection(projection.wants_name, attributes, attributes_for)
        resource_key = None if group_by == "service.name" else group_by  # Span.service has it
        return cls(widened, since, until, resource_key, names)


def records_of(spans: list[Span], groups: list[Any] | None, keep: SpanFilter,
               bare: Collection[str] = ()) -> Batch:
    """Decoded spans (the JSON path) as records; `groups` holds each one's resource attribute.
    Traces in `bare` (none of their spans kept) get an empty list: known by their id alone."""
    batch: Batch = {trace_id: [] for trace_id in bare}
    since, until = keep.since_ns, keep.until_ns
    for index, s in enumerate(spans):
        if s.name == VIOLATION_SPAN or not since <= s.start_ns < until:
            continue
        record = (s.span_id, s.parent_span_id, s.name, s.start_ns, s.end_ns, s.status, s.kind,
                  s.service, s.attributes or _NO_ATTRIBUTES,
                  None if groups is None else groups[index])
        bucket = batch.get(s.trace_id)
        if bucket is None:
            batch[s.trace_id] = [record]
        else:
            bucket.append(record)
    return batch


def _lean_classes() -> tuple[Any, Any]:
    """ExportTraceServiceRequest reduced to what replay reads, in two steps: the request with
    each ScopeSpans left as bytes (a scope holding no selected span name is skipped unparsed),
    then a scope's spans. Attributes are parsed as `map<string, bytes>`, which has KeyValue's
    wire layout, so upb indexes them by key in C and only the AnyValues rules read are decoded
    in Python (a key repeated in one span, which OTLP forbids, keeps its last value where the
    live path keeps its first). Fields left out (events, links, scopes...) are skipped."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="betrace_replay_lean.proto",
                                              package="betrace.lean", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, bool, str],
                parent: Any = None) -> Any:
        added = (parent.nested_type if parent else file.message_type).add(name=name)
        for field, number, kind, repeated, type_name in fields:
            added.field.add(name=field, number=number, type=kind,  # type: ignore[arg-type]
                            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL,
                            **({"type_name": ".betrace.lean." + type_name} if type_name else {}))
        return added

    def attributes_map(parent: Any) -> None:
        entry = message("AttributesEntry", ("key", 1, F.TYPE_STRING, False, ""),
                        ("value", 2, F.TYPE_BYTES, False, ""), parent=parent)
        entry.options.map_entry = True

    span = message("Span", ("trace_id", 1, F.TYPE_BYTES, False, ""),
                   ("span_id", 2, F.TYPE_BYTES, False, ""),
                   ("parent_span_id", 4, F.TYPE_BYTES, False, ""),
                   ("name", 5, F.TYPE_STRING, False, ""), ("kind", 6, F.TYPE_INT32, False, ""),
                   ("start", 7, F.TYPE_FIXED64, False, ""), ("end", 8, F.TYPE_FIXED64, False, ""),
                   ("attributes", 9, F.TYPE_MESSAGE, True, "Span.AttributesEntry"),
                   ("status", 15, F.TYPE_BYTES, False, ""))  # see _status
    attributes_map(span)
    message("ScopeSpans", ("spans", 2, F.TYPE_MESSAGE, True, "Span"))
    attributes_map(message("Resource", ("attributes", 1, F.TYPE_MESSAGE, True,
                                        "Resource.AttributesEntry")))
    message("ResourceSpans", ("resource", 1, F.TYPE_MESSAGE, False, "Resource"),
            ("scope_spans", 2, F.TYPE_BYTES, True, ""))
    message("Request", ("resource_spans", 1, F.TYPE_MESSAGE, True, "ResourceSpans"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"betrace.lean.{n}"))
                 for n in ("Request", "ScopeSpans"))  # type: ignore[return-value]


_Request, _ScopeSpans = _lean_classes()


class ProtoDecoder:
    """ExportTraceServiceRequest bytes to a Batch. A scope without any selected span name costs
    one substring search; a span no rule selects, one name test."""

    def __init__(self, keep: SpanFilter) -> None:
        self.keep = keep
        names = keep.names
        # A selected name is on the wire as field 5 (tag 0x2a), its length (a minimal varint, as
        # every encoder writes it), its UTF-8 bytes; a scope holding those bytes anywhere is
        # parsed and its span names compared exactly.
        self.tags = None if names is None else tuple(
            b"\x2a" + _varint(len(n.encode())) + n.encode() for n in sorted(names))
        self.reads: dict[str, tuple[str, frozenset[str] | None]] = {}  # name -> (name, keys)
        self.hex_ids: dict[bytes, str] = {}  # one str per trace id (cleared per request)
        # trace ids of spans not kept, when the projection keeps ids (cleared per request)
        self.bare: set[str] | None = set() if keep.projection.trace_ids else None

    def decode(self, payload: bytes, bad: list[str]) -> Batch:
        """The kept records by trace id; with `projection.trace_ids`, a trace none of whose
        spans here is kept has an empty list (it is known by its id alone)."""
        try:
            request = _Request.FromString(payload)
        except DecodeError as exc:
            raise ValueError(f"not an OTLP ExportTraceServiceRequest ({len(payload)} bytes): "
                             f"{_reason(exc)}") from None
        keep, tags = self.keep, self.tags
        batch: Batch = {}
        self.hex_ids.clear()
        for resource_spans in request.resource_spans:
            service = group = None
            resource = resource_spans.resource.attributes
            if resource:
                try:
                    service = _any(resource.get("service.name", b""))
                    if keep.resource_key is not None:
                        group = _any(resource.get(keep.resource_key, b""))
                except (DecodeError, ValueError) as exc:  # the spans still count
                    bad.append(f"invalid resource attribute: {_reason(exc)}")
                if type(service) is not str:
                    service = None
            for scope in resource_spans.scope_spans:
                if tags is not None and not any(tag in scope for tag in tags):
                    continue
                try:
                    spans = _ScopeSpans.FromString(scope).spans
                except DecodeError as exc:
                    bad.append(f"invalid ScopeSpans ({len(scope)} bytes): {_reason(exc)}")
                    continue
                self._spans(spans, service, group, batch, bad)
        if self.bare:
            for trace_id in self.bare:
                if trace_id not in batch:
                    batch[trace_id] = []
            self.bare.clear()
        return batch

    def _spans(self, spans: Any, service: str | None, group: Any, batch: Batch,
               bad: list[str]) -> None:
        """The hot loop: for a span no rule selects, one name test and nothing else."""
        keep, reads, hex_ids = self.keep, self.reads, self.hex_ids
        wants, since, until = keep.projection.wants_name, keep.since_ns, keep.until_ns
        window = since > 0 or until < 2**64
        bare = self.bare
        for span in spans:
            name = span.name
            if not wants(name) or name == VIOLATION_SPAN:
                if bare is not None and name != VIOLATION_SPAN and len(span.trace_id) == 16 \
                        and span.trace_id != _ZERO_TRACE and since <= span.start < until:
                    bare.add(span.trace_id.hex())
                continue
            start = span.start
            if window and not since <= start < until:
                continue
            trace_id, span_id = span.trace_id, span.span_id
            tid = hex_ids.get(trace_id)
            if tid is None:
                if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
                    bad.append(f"span {name!r}: invalid trace_id {trace_id.hex()!r}")
                    continue
                tid = hex_ids[trace_id] = trace_id.hex()
            if len(span_id) != 8 or span_id == _ZERO_SPAN:
                bad.append(f"span {name!r}: invalid span_id {span_id.hex()!r}")
                continue
            known = reads.get(name)
            if known is None:
                known = reads[name] = (name, keep.projection.attributes_for(name))
            name, keys = known
            raw = span.attributes
            try:
                if keys:
                    attributes = {}
                    for key in keys:
                        value = raw.get(key)
                        if value is not None:
                            attributes[key] = _any(value)
                elif keys is None:
                    attributes = {key: _any(value) for key, value in raw.items()}
                else:
                    attributes = _NO_ATTRIBUTES
                status = _STATUS_BYTES.get(span.status) or _status(span.status)
            except (DecodeError, ValueError) as exc:
                reason = _reason(exc) if isinstance(exc, DecodeError) else exc
                bad.append(f"span {name!r}: invalid attribute or status: {reason}")
                continue
            parent = span.parent_span_id
            record = (span_id.hex(), parent.hex() if parent != _ZERO_SPAN else "", name, start,
                      span.end, status,
                      _KIND.get(span.kind, "UNSPECIFIED"), service,
                      attributes or _NO_ATTRIBUTES, group)
            bucket = batch.get(tid)
            if bucket is None:
                batch[tid] = [record]
            else:
                bucket.append(record)


def _reason(error: DecodeError) -> str:
    """upb's reason without the name of our reduced message type."""
    return str(error).rsplit(": ", 1)[-1]


def _status(raw: bytes) -> str:
    """A Status with a message, or anything unusual, through the protobuf class."""
    code = Status.FromString(raw).code
    return STATUSES[code] if 0 <= code < len(STATUSES) else "UNSET"


def _any(raw: bytes) -> Any:
    """An AnyValue's bytes as the rule engine sees it: a short string, an int, a bool or a
    double by hand (nearly every value), anything else through the protobuf classes."""
    size = len(raw)
    if size > 1:
        tag = raw[0]
        if tag == 0x0A:  # string_value
            if raw[1] == size - 2:
                return raw[2:].decode()
        elif tag == 0x18:  # int_value: a varint, two's complement for negatives
            if size == 2:
                return raw[1]
            value = shift = 0
            for index in range(1, size):
                byte = raw[index]
                value |= (byte & 0x7F) << shift
                if byte < 0x80:
                    if index + 1 == size:
                        return value - (1 << 64) if value >= 1 << 63 else value
                    break
                shift += 7
        elif tag == 0x10 and size == 2:  # bool_value
            return raw[1] != 0
        elif tag == 0x21 and size == 9:  # double_value
            return _DOUBLE.unpack_from(raw, 1)[0]
    return any_value(AnyValue.FromString(raw))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

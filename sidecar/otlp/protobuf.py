"""OTLP protobuf (ExportTraceServiceRequest bytes) to spans, grouped by trace: the one protobuf
decoder, for live ingest and replay alike.

The request is parsed in steps: upb parses the request with each ScopeSpans left as bytes; when
the selected span names are known exactly (`Projection.names`), a C walk over each scope's wire
format (`_wire.select_spans`) counts its spans and keeps the bytes of those a rule selects; upb
parses what is kept, with attributes as raw AnyValue bytes. So a span no rule selects costs a walk
over its field headers in C, and is neither parsed nor validated; a kept span decodes only the
attributes its rules read (the `Projection`). BeTrace's own violation spans, coming back through
the collector, are counted and skipped."""

from __future__ import annotations

import functools
import struct
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import KINDS, STATUSES, span_of
from sidecar.otlp._wire import select_spans
from sidecar.otlp.decoded import Decoded, SpanFilter

_DOUBLE = struct.Struct("<d")
_NO_ATTRIBUTES: dict[str, Any] = {}  # shared by every span that keeps none: never mutated
_ZERO_TRACE, _ZERO_SPAN = bytes(16), bytes(8)
_KIND = dict(enumerate(KINDS))
# A Status is kept as bytes: without a message (the usual case) these are all it can be.
# A selected span keeping at most this many attributes searches its list for them
_SEARCHED_UP_TO = 2
_OWN: Any = ("", None)  # what `ProtobufDecoder.reads` holds for BeTrace's own violation spans
_STATUS_BYTES = {b"": "UNSET", b"\x18\x00": "UNSET", b"\x18\x01": "OK", b"\x18\x02": "ERROR"}


@functools.cache
def _lean_classes() -> tuple[Any, ...]:
    """ExportTraceServiceRequest reduced to what rules read, in two steps: the request with
    each ScopeSpans left as bytes (for `select_spans`), then a scope's spans. An attribute's
    value stays AnyValue bytes until a rule needs it, then the common types are decoded by hand
    (`_any`). Fields left out (events, links, scopes...) are skipped.

    A scope's spans come in two shapes of one wire layout: attributes as a list of KeyValues,
    searched until the wanted keys are found, or indexed by key in C (`map<string, bytes>`),
    where they are looked up; see `ProtobufDecoder`."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="betrace_lean.proto",
                                              package="betrace.lean", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, bool, str]) -> Any:
        added = file.message_type.add(name=name)
        for field, number, kind, repeated, type_name in fields:
            added.field.add(name=field, number=number, type=kind,  # type: ignore[arg-type]
                            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL,
                            **({"type_name": ".betrace.lean." + type_name} if type_name else {}))
        return added

    message("KeyValue", ("key", 1, F.TYPE_STRING, False, ""),
            ("value", 2, F.TYPE_BYTES, False, ""))
    span = (("trace_id", 1, F.TYPE_BYTES, False, ""), ("span_id", 2, F.TYPE_BYTES, False, ""),
            ("parent_span_id", 4, F.TYPE_BYTES, False, ""), ("name", 5, F.TYPE_STRING, False, ""),
            ("kind", 6, F.TYPE_INT32, False, ""), ("start", 7, F.TYPE_FIXED64, False, ""),
            ("end", 8, F.TYPE_FIXED64, False, ""),
            ("status", 15, F.TYPE_BYTES, False, ""))  # see _status
    message("Span", *span, ("attributes", 9, F.TYPE_MESSAGE, True, "KeyValue"))
    message("ScopeSpans", ("spans", 2, F.TYPE_MESSAGE, True, "Span"))
    message("AttributesEntry", ("key", 1, F.TYPE_STRING, False, ""),
            ("value", 2, F.TYPE_BYTES, False, "")).options.map_entry = True
    message("IndexedSpan", *span, ("attributes", 9, F.TYPE_MESSAGE, True, "AttributesEntry"))
    message("IndexedScopeSpans", ("spans", 2, F.TYPE_MESSAGE, True, "IndexedSpan"))
    message("RawScopeSpans", ("spans", 2, F.TYPE_BYTES, True, ""))  # see ProtobufDecoder._one_by_one
    message("Resource", ("attributes", 1, F.TYPE_MESSAGE, True, "AttributesEntry"))
    message("ResourceSpans", ("resource", 1, F.TYPE_MESSAGE, False, "Resource"),
            ("scope_spans", 2, F.TYPE_BYTES, True, ""))
    message("Request", ("resource_spans", 1, F.TYPE_MESSAGE, True, "ResourceSpans"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"betrace.lean.{n}"))
                 for n in ("Request", "ScopeSpans", "IndexedScopeSpans", "RawScopeSpans", "Span",
                           "IndexedSpan"))



class ProtobufDecoder:
    """ExportTraceServiceRequest bytes to `Decoded` spans, as `keep` says. Safe to share between
    threads: what one request needs is local to its call.

    A selected span that keeps at most a couple of attributes finds them fastest by searching
    its list (it stops once they are found); one that keeps more, or every attribute, by
    looking them up in an index, which costs every span parsed its indexing (measured on
    bench/ingest.py's workloads and bench/replay.py's payment rule)."""

    def __init__(self, keep: SpanFilter) -> None:
        self.keep = keep
        self._request, listed, indexed, raw_scope, span, indexed_span = _lean_classes()
        self._raw_scope = raw_scope.FromString
        most = keep.projection.most_attributes
        self.indexed = most is None or most > _SEARCHED_UP_TO
        self._scope_spans = (indexed if self.indexed else listed).FromString
        self._span = (indexed_span if self.indexed else span).FromString
        # The names select_spans keeps (the violation spans' too, to count them), or None: every
        # span is parsed and its name tested in Python (see Projection.names).
        names = keep.projection.names
        self.selected_names = None if names is None else \
            tuple(sorted(name.encode() for name in names | {VIOLATION_SPAN}))
        # per span name: the one str for it, and the attributes to keep (None: every one); a
        # name no rule selects maps to None, the violation spans' to _OWN
        self.reads: dict[str, tuple[str, frozenset[str] | None] | None] = {}

    def decode(self, payload: bytes) -> Decoded:
        """Raise ValueError with a reason when `payload` is no ExportTraceServiceRequest; a bad
        scope, span or attribute is reported in `invalid` and skipped."""
        try:
            request = self._request.FromString(payload)
        except DecodeError as exc:
            raise ValueError(f"not an OTLP ExportTraceServiceRequest ({len(payload)} bytes): "
                             f"{_reason(exc)}") from None
        keep, indexed, scope_spans = self.keep, self.indexed, self._scope_spans
        selected_names = self.selected_names
        group_key = keep.resource_key
        out = Decoded()
        hex_ids: dict[bytes, str] = {}  # one str per trace id, not one per span
        refused = 0  # spans in `invalid`
        bare: set[bytes] | None = set() if keep.projection.trace_ids else None
        for resource_spans in request.resource_spans:
            service = version = group = None
            resource = resource_spans.resource.attributes
            if resource:
                try:
                    if (raw := resource.get("service.name")) is not None:
                        service = _any(raw)
                    if (raw := resource.get("service.version")) is not None:
                        version = _any(raw)
                    if group_key is not None and (raw := resource.get(group_key)) is not None:
                        group = _any(raw)
                except (DecodeError, ValueError) as exc:  # the spans still count
                    out.invalid.append(f"invalid resource attribute: {_reason(exc)}")
                if type(service) is not str:
                    service = None
                if type(version) is not str:
                    version = None
            for scope in resource_spans.scope_spans:
                walked = None if selected_names is None else select_spans(scope, selected_names)
                if walked is not None:  # (None: not well-formed, upb says where below)
                    out.received += walked[0]
                    scope = walked[1]
                    if scope is None:
                        continue
                invalid = len(out.invalid)
                try:
                    spans = scope_spans(scope).spans
                except DecodeError:
                    spans = self._one_by_one(scope, out)
                if walked is None:
                    out.received += len(spans) + len(out.invalid) - invalid
                self._spans(spans, service, version, group, out, hex_ids, bare, indexed)
                refused += len(out.invalid) - invalid
        kept = sum(map(len, out.batch.values()))
        out.not_selected = out.received - out.own - refused - kept
        if bare:
            out.bare_trace_ids = {trace_id.hex() for trace_id in bare} - out.batch.keys()
        return out

    def _one_by_one(self, scope: bytes, out: Decoded) -> list[Any]:
        """The spans of a scope upb refused as a whole (one span with a name or key that is not
        UTF-8, say), parsed one at a time: each bad span is refused alone, in `out.invalid`."""
        try:
            raw_spans = self._raw_scope(scope).spans
        except DecodeError as exc:  # the scope's own framing is broken: nothing to split
            out.invalid.append(f"invalid ScopeSpans ({len(scope)} bytes): {_reason(exc)}")
            return []
        spans = []
        for raw in raw_spans:
            try:
                spans.append(self._span(raw))
            except DecodeError as exc:
                out.invalid.append(f"invalid span ({len(raw)} bytes): {_reason(exc)}")
        return spans

    def _spans(self, spans: Any, service: str | None, version: str | None, group: Any,
               out: Decoded, hex_ids: dict[bytes, str], bare: set[bytes] | None,
               indexed: bool) -> None:
        """The hot loop: for a span no rule selects, one name test and nothing else."""
        keep, reads, batch, invalid = self.keep, self.reads, out.batch, out.invalid
        since, until = keep.since_ns, keep.until_ns
        window = since > 0 or until < 2**64
        for span in spans:
            name = span.name
            try:
                selected = reads[name]
            except KeyError:
                selected = reads[name] = _OWN if name == VIOLATION_SPAN else \
                    (name, keep.projection.attributes_for(name)) \
                    if keep.projection.wants_name(name) else None
            if selected is None:  # (counted as not selected by `decode`)
                if bare is not None and len(span.trace_id) == 16 \
                        and span.trace_id != _ZERO_TRACE and since <= span.start < until:
                    bare.add(span.trace_id)
                continue
            if selected is _OWN:
                out.own += 1
                continue
            start = span.start
            if window and not since <= start < until:
                continue
            trace_id, span_id = span.trace_id, span.span_id
            tid = hex_ids.get(trace_id)
            if tid is None:
                if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
                    invalid.append(f"span {name!r}: invalid trace_id {trace_id.hex()!r}")
                    continue
                tid = hex_ids[trace_id] = trace_id.hex()
            if len(span_id) != 8 or span_id == _ZERO_SPAN:
                invalid.append(f"span {name!r}: invalid span_id {span_id.hex()!r}")
                continue
            name, keys = selected
            raw = span.attributes  # (OTLP forbids a key repeated in a span: one value wins)
            try:
                if not keys:
                    attributes = _NO_ATTRIBUTES if keys is not None else \
                        {key: _any(value) for key, value in raw.items()} if indexed else \
                        {kv.key: _any(kv.value) for kv in raw}
                elif indexed:
                    attributes = {}
                    for key in keys:
                        value = raw.get(key)
                        if value is not None:
                            attributes[key] = _any(value)
                else:
                    attributes, wanted = {}, len(keys)
                    for kv in raw:
                        key = kv.key
                        if key in keys:
                            attributes[key] = _any(kv.value)
                            if len(attributes) == wanted:
                                break
                status = _STATUS_BYTES.get(span.status) or _status(span.status)
            except (DecodeError, ValueError) as exc:
                reason = _reason(exc) if isinstance(exc, DecodeError) else exc
                invalid.append(f"span {name!r}: invalid attribute or status: {reason}")
                continue
            parent = span.parent_span_id
            decoded = span_of(tid, span_id.hex(), name,
                              parent.hex() if parent != _ZERO_SPAN else "", start, span.end,
                              status, _KIND.get(span.kind, "UNSPECIFIED"), service, version,
                              attributes or _NO_ATTRIBUTES, group)
            bucket = batch.get(tid)
            if bucket is None:
                batch[tid] = [decoded]
            else:
                bucket.append(decoded)


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

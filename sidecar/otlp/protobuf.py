"""OTLP protobuf (ExportTraceServiceRequest bytes) to spans, grouped by trace: the one protobuf
decoder, for live ingest and replay alike.

upb parses the request with each ScopeSpans left as bytes and each resource's attributes indexed;
then C (`_wire.decode_scope`) decodes a scope's spans straight from the wire format: a span no
rule selects costs a walk over its field headers, and is neither parsed nor validated; a selected
one becomes a `Span` holding only the attributes its rules read (the `Projection`). BeTrace's own
violation spans, coming back through the collector, are counted and skipped."""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import KINDS, NO_ATTRIBUTES, SLOT_DESCRIPTORS, STATUSES, Span
from sidecar.otlp._wire import decode_scope
from sidecar.otlp.decoded import Decoded, SpanFilter

_OWN: Any = ("", None)  # what `ProtobufDecoder.reads` holds for BeTrace's own violation spans
_NO_RESOURCE = (None, None, None)  # (service, version, group) of a resource without attributes


@functools.cache
def _request_class() -> Any:
    """ExportTraceServiceRequest reduced to what upb parses before the C decoder: each resource's
    attributes indexed by key (values left as AnyValue bytes until read), each ScopeSpans left as
    bytes for `decode_scope`. Fields left out are skipped."""
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

    message("AttributesEntry", ("key", 1, F.TYPE_STRING, False, ""),
            ("value", 2, F.TYPE_BYTES, False, "")).options.map_entry = True
    message("Resource", ("attributes", 1, F.TYPE_MESSAGE, True, "AttributesEntry"))
    message("ResourceSpans", ("resource", 1, F.TYPE_MESSAGE, False, "Resource"),
            ("scope_spans", 2, F.TYPE_BYTES, True, ""))
    message("Request", ("resource_spans", 1, F.TYPE_MESSAGE, True, "ResourceSpans"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("betrace.lean.Request"))


class ProtobufDecoder:
    """ExportTraceServiceRequest bytes to `Decoded` spans, as `keep` says. Safe to share between
    threads: what one request needs is local to its call (`reads` only grows, by whole items)."""

    def __init__(self, keep: SpanFilter) -> None:
        self.keep = keep
        self._request = _request_class().FromString
        projection = keep.projection
        # per span name (UTF-8 bytes): None when no rule selects it, _OWN for the violation
        # spans, else (the one str for the name, the attributes to keep: None keeps every one).
        # With the selected names known exactly, that is all of them and a name not here is not
        # selected; otherwise each new name is classified once (`_classify`).
        self.reads: dict[bytes, tuple[str, tuple[str, ...] | None] | None] = {
            VIOLATION_SPAN.encode(): _OWN}
        names = projection.names
        for name in names or ():
            self.reads[name.encode()] = self._selection(name)
        classify = self._classify if names is None else None
        # the window [since, until) as C reads it: since <= start <= last
        since, last = max(keep.since_ns, 0), min(keep.until_ns, 2**64) - 1
        # a resource's attribute values (service.name, service.version, group) -> what they give
        self._resources: dict[tuple[bytes | None, ...], tuple[str | None, str | None, Any]] = {}
        self.plan = (self.reads, classify, _OWN, Span, SLOT_DESCRIPTORS, KINDS, STATUSES,
                     _value, _status, NO_ATTRIBUTES,
                     *((since, last) if since <= last else (1, 0)))

    def _resource(self, raws: tuple[bytes | None, bytes | None, bytes | None],
                  invalid: list[str]) -> tuple[str | None, str | None, Any]:
        """A resource's (service, version, group) from their AnyValue bytes. The same few
        resources come in every request (one per service and version), so a well-formed one is
        remembered; a malformed one is reported each time (its spans still count)."""
        found: list[Any] = [None, None, None]
        try:
            for number, raw in enumerate(raws):
                if raw is not None:
                    found[number] = _value(raw)
        except ValueError as exc:
            invalid.append(f"invalid resource attribute: {exc}")
            raws = None  # type: ignore[assignment]
        service, version, group = found
        values = (service if type(service) is str else None,
                  version if type(version) is str else None, group)
        if raws is not None:
            if len(self._resources) >= 4096:  # never grow without bound
                self._resources.clear()
            self._resources[raws] = values
        return values

    def _selection(self, name: str) -> tuple[str, tuple[str, ...] | None] | None:
        projection = self.keep.projection
        if name == VIOLATION_SPAN:
            return _OWN
        if not projection.wants_name(name):
            return None
        keys = projection.attributes_for(name)
        return name, None if keys is None else tuple(sorted(keys))

    def _classify(self, name: bytes) -> tuple[str, tuple[str, ...] | None] | None:
        """A span name not seen before (raises UnicodeDecodeError when it is not UTF-8)."""
        selection = self._selection(name.decode())
        if len(self.reads) < 10_000:  # span names are few; never grow without bound
            self.reads[name] = selection
        return selection

    def decode(self, payload: bytes) -> Decoded:
        """Raise ValueError with a reason when `payload` is no ExportTraceServiceRequest; a bad
        scope, span or attribute is reported in `invalid` and skipped."""
        try:
            request = self._request(payload)
        except DecodeError as exc:
            raise ValueError(f"not an OTLP ExportTraceServiceRequest ({len(payload)} bytes): "
                             f"{_reason(exc)}") from None
        keep, plan = self.keep, self.plan
        group_key = keep.resource_key
        out = Decoded()
        batch, invalid = out.batch, out.invalid
        hex_ids: dict[str, str] = {}  # one str per trace id, not one per span
        refused = 0  # spans in `invalid` (a resource's bad attribute is there too)
        bare: set[bytes] | None = set() if keep.projection.trace_ids else None
        for resource_spans in request.resource_spans:
            values = _NO_RESOURCE
            resource = resource_spans.resource.attributes
            if resource:
                raws = (resource.get("service.name"), resource.get("service.version"),
                        None if group_key is None else resource.get(group_key))
                values = self._resources.get(raws) or self._resource(raws, invalid)
            for scope in resource_spans.scope_spans:
                received, own, bad = decode_scope(scope, plan, values, batch, hex_ids, invalid,
                                                  bare)
                out.received += received
                out.own += own
                refused += bad
        kept = sum(map(len, batch.values()))
        out.not_selected = out.received - out.own - refused - kept
        if bare:
            out.bare_trace_ids = {trace_id.hex() for trace_id in bare} - batch.keys()
        return out


def _reason(error: DecodeError) -> str:
    """upb's reason without the name of our reduced message type."""
    return str(error).rsplit(": ", 1)[-1]


def _status(raw: bytes) -> str:
    """A Status decode_scope found malformed: the reason it is, as upb words it."""
    try:
        code = Status.FromString(raw).code
    except DecodeError as exc:
        raise ValueError(_reason(exc)) from None
    return STATUSES[code] if 0 <= code < len(STATUSES) else "UNSET"


def _value(raw: bytes) -> Any:
    """An AnyValue's bytes as the rule engine sees it (decode_scope reads the usual ones)."""
    try:
        return any_value(AnyValue.FromString(raw))
    except DecodeError as exc:
        raise ValueError(_reason(exc)) from None


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

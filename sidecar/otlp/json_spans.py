"""OTLP JSON to spans: an ExportTraceServiceRequest as an OTLP/HTTP body, a line of the Collector
file exporter's output (`read_requests` streams those: one request per line, or one
pretty-printed over many lines), or the request in a Tempo or Jaeger answer.

A request in the common shape is decoded in one pass in C (`_wire.decode_json`, the protobuf
decoder's sibling): a span no rule selects costs a scan for its name, the attributes of a
selected one are decoded only for the keys its rules read (the `Projection`). The C gives up on
anything outside that shape (anything malformed, a span to refuse, base64 ids, arrays among the
values read...); then the Python passes decode it: a typed one by msgspec, which keeps each
span's attributes and status as raw JSON, and for what that does not accept (a field of an
unexpected type, say) a lenient one from `orjson`'s parse, which says exactly what was wrong.
A malformed line or span is skipped and reported (an `InputError` for a file), never fatal, so
the caller can say exactly which data went unchecked.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import IO, Any

import msgspec
import orjson

from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import KINDS, STATUSES, Projection, Span, span_of
from sidecar.otlp._wire import decode_json as decode_json_c
from sidecar.otlp.decoded import Decoded, SpanFilter
from sidecar.otlp.protobuf import ProtobufDecoder

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_HEX = "0123456789abcdef"
_URLSAFE_TO_STD = str.maketrans("-_", "+/")
_KINDS: dict[int | str, str] = {**dict(enumerate(KINDS)), **{f"SPAN_KIND_{k}": k for k in KINDS}}
_STATUSES: dict[int | str, str] = {
    **dict(enumerate(STATUSES)), **{f"STATUS_CODE_{s}": s for s in STATUSES}
}
_SERVICE = frozenset(("service.name", "service.version"))  # what a Span keeps of its resource
_NOTHING: dict[str, Any] = {}  # read only: an absent resource, status or value
_EMPTY: Any = object()  # an AnyValue with no value set


@dataclass(frozen=True)
class InputError:
    """A piece of input that was skipped, located so an operator can find and fix it: by line
    in a text format, by byte offset (`offset`, then `line` is 0) in a binary one."""

    source: str
    line: int
    reason: str
    offset: int | None = None

    def __str__(self) -> str:
        if self.offset is not None:
            return f"{self.source}@{self.offset}: {self.reason}"
        return f"{self.source}:{self.line}: {self.reason}"


def read_requests(stream: IO[bytes], keep: SpanFilter, report: Callable[[int, str], None]
                  ) -> Iterator[tuple[int, Decoded]]:
    """Each JSON request of an open stream, decoded as `keep` says, with the line it starts on:
    line by line, or the whole input at once if its first line opens a document. A line that is
    not JSON, or no request, is reported (line, reason) and skipped; errors of the stream itself
    (bad compressed data) are the caller's."""
    numbered = enumerate(stream, 1)
    for number, line in numbered:
        if not line.isspace():
            break
    else:
        return
    line = line.removeprefix(_BOM)
    # A JSONL record ends with "}"; a first line ending in "{" or "[" opens a document,
    # which is then read as one "line" (its errors are located at its first line).
    if line.rstrip().endswith((b"{", b"[")):
        lines: Iterator[tuple[int, bytes]] = iter(((number, line + stream.read()),))
    else:
        lines = chain(((number, line),), numbered)
    for number, line in lines:
        if line.isspace():
            continue
        try:
            decoded = decode_json(line, keep)
        except orjson.JSONDecodeError as exc:
            report(*_locate(exc, number, line))
            continue
        except ValueError as exc:
            report(number, str(exc))
            continue
        yield number, decoded


def _locate(exc: orjson.JSONDecodeError, first: int, text: bytes) -> tuple[int, str]:
    """Line and reason of a JSON error in `text`, which starts at line `first`."""
    line, last = first + exc.lineno - 1, first + text.rstrip().count(b"\n")
    if line > last:  # orjson places "unexpected end of data" past the final newline
        return last, f"invalid JSON: {exc.msg}"
    return line, f"invalid JSON at column {exc.colno}: {exc.msg}"


def decode_json(data: bytes, keep: SpanFilter) -> Decoded:
    """One ExportTraceServiceRequest as JSON bytes (an OTLP/HTTP body, a file line, a Tempo
    answer) as `otlp.protobuf.ProtobufDecoder` decodes protobuf: the same spans kept, with the
    same attributes, the same counts, the same ids held. Invalid JSON raises
    `orjson.JSONDecodeError` (a ValueError, with the line and column), a malformed request
    ValueError.

    The common shape is decoded in C (`_wire.decode_json`), which gives up on anything else:
    then the typed pass, then the lenient one, decode it and say what is wrong."""
    plan = _c_plan(keep)
    if plan is not None:
        out = Decoded()
        counts = decode_json_c(data, *plan, out.batch, {})
        if counts is not None:
            out.received, out.own = counts
            out.not_selected = out.received - out.own - sum(map(len, out.batch.values()))
            return out
    return decode_json_python(data, keep)


@functools.lru_cache(maxsize=16)
def _c_plan(keep: SpanFilter) -> tuple[Any, ...] | None:
    """What `_wire.decode_json` needs for `keep`: the protobuf decoder's plan (what each span
    name selects), the --group-by resource key and the attributes read on BeTrace's own spans
    (checked as the typed pass checks them). None when the ids of unselected traces are kept
    (a rule fires without its spans): only the Python passes do that."""
    projection = keep.projection
    if projection.trace_ids:
        return None
    own = projection.attributes_for(VIOLATION_SPAN)
    return (ProtobufDecoder(keep).plan, keep.resource_key,
            None if own is None else tuple(sorted(own)))


def decode_json_python(data: bytes, keep: SpanFilter) -> Decoded:
    """`decode_json` in Python: the typed pass, and the lenient one for what it refuses."""
    try:
        request = _REQUEST.decode(data)
    except msgspec.DecodeError:  # not JSON, or a field the typed pass does not accept
        return decode_json_request(orjson.loads(data), keep)
    resource_spans = request.resourceSpans
    if resource_spans is msgspec.UNSET and request.batches is not msgspec.UNSET:
        resource_spans = request.batches  # Tempo says "batches"
    if type(resource_spans) is not list:  # absent, null: the lenient pass says what it means
        return decode_json_request(orjson.loads(data), keep)
    out = Decoded()
    bare: set[str] | None = set() if keep.projection.trace_ids else None
    spans, out.received = _decode_typed(resource_spans, keep.projection, out.invalid,
                                        keep.resource_key, bare, (keep.since_ns, keep.until_ns))
    return _decoded(out, spans, keep, bare)


def decode_json_request(doc: Any, keep: SpanFilter) -> Decoded:
    """`decode_json` of a request already parsed by `orjson`: the lenient pass, which names
    exactly what is malformed."""
    out = Decoded()
    bare: set[str] | None = set() if keep.projection.trace_ids else None
    # our own violation spans come through, to be counted as such rather than as not selected
    spans, out.received = _decode(doc, keep.projection, out.invalid, keep.resource_key, bare,
                                  (keep.since_ns, keep.until_ns))
    return _decoded(out, spans, keep, bare)


def _decoded(out: Decoded, spans: list[Span], keep: SpanFilter, bare: set[str] | None
             ) -> Decoded:
    """`out` completed with the decoded spans: BeTrace's own counted, the rest in the window
    batched by trace."""
    since, until = keep.since_ns, keep.until_ns
    for span in spans:
        if span.name == VIOLATION_SPAN:
            out.own += 1
        elif since <= span.start_ns < until:
            out.batch.setdefault(span.trace_id, []).append(span)
    out.not_selected = out.received - len(out.invalid) - out.own - sum(map(len, out.batch.values()))
    if bare:
        out.bare_trace_ids = bare - out.batch.keys()
    return out


# --- the typed pass (msgspec) ----------------------------------------------------------------
# Fields typed as the lenient pass requires them; those it checks span by span are `Any`, so
# that one bad span does not send the whole request to the lenient pass.

_NO_JSON = msgspec.Raw(b"")  # a field that is absent


class _KeyValue(msgspec.Struct, gc=False):
    key: str
    value: msgspec.Raw = msgspec.Raw(b"null")


class _Span(msgspec.Struct, gc=False):
    traceId: Any = None
    spanId: Any = None
    parentSpanId: Any = None
    name: Any = msgspec.UNSET
    kind: Any = 0
    startTimeUnixNano: Any = None
    endTimeUnixNano: Any = None
    status: msgspec.Raw = _NO_JSON
    attributes: msgspec.Raw = _NO_JSON


class _Scope(msgspec.Struct, gc=False):
    spans: list[_Span] = []


class _ResourceSpans(msgspec.Struct, gc=False):
    resource: msgspec.Raw = _NO_JSON
    scopeSpans: list[_Scope] | None = None
    instrumentationLibrarySpans: list[_Scope] | None = None  # OTLP before 0.15


class _Request(msgspec.Struct, gc=False):
    resourceSpans: list[_ResourceSpans] | None | msgspec.UnsetType = msgspec.UNSET
    batches: list[_ResourceSpans] | None | msgspec.UnsetType = msgspec.UNSET


_REQUEST = msgspec.json.Decoder(_Request)
_KEY_VALUES = msgspec.json.Decoder(list[_KeyValue])
_STATUS_OF: dict[bytes, str] = {}  # a status's JSON, as written, to its code's name
_parse = msgspec.json.Decoder().decode  # a part of a document already found to be JSON


def _decode_typed(resource_spans: list[_ResourceSpans], projection: Projection, bad: list[str],
                  resource_key: str | None, bare: set[str] | None, bare_window: tuple[int, int]
                  ) -> tuple[list[Span], int]:
    """`_decode` of a typed request: the same spans and reasons."""
    wants, keep_for = projection.wants_name, projection.attributes_for
    selected: dict[str, frozenset[str] | None | bool] = {}  # per name: its keys, False if not
    spans: list[Span] = []
    received = 0
    for entry in resource_spans:
        resource = _parse(entry.resource) if entry.resource else _NOTHING
        service, version, extra = _resource(resource, resource_key)
        scopes = entry.scopeSpans
        if scopes is None:
            scopes = entry.instrumentationLibrarySpans or []
        for scope in scopes:
            raw_spans = scope.spans
            received += len(raw_spans)
            for raw in raw_spans:
                name = raw.name
                if type(name) is not str:
                    if name is msgspec.UNSET:
                        name = ""
                    else:
                        bad.append("span: name is not a string")
                        continue
                try:
                    keys = selected[name]
                except KeyError:
                    keys = selected[name] = keep_for(name) \
                        if wants(name) or name == VIOLATION_SPAN else False
                if keys is False:
                    if bare is not None:  # not selected: its trace is still known by its id
                        trace_id = _id(raw.traceId, 16)
                        start = _nanos(raw.startTimeUnixNano) or 0
                        if trace_id and bare_window[0] <= start < bare_window[1]:
                            bare.add(trace_id)
                    continue
                try:
                    span = _typed_span(raw, name, keys, service,  # type: ignore[arg-type]
                                       version)
                except ValueError as exc:
                    bad.append(f"span {name!r}: {exc}" if raw.name else f"span: {exc}")
                    continue
                span.group = extra
                spans.append(span)
    return spans, received


def _typed_span(raw: _Span, name: str, keys: frozenset[str] | None, service: str | None,
                version: str | None) -> Span:
    """`_span` of a typed span: the same checks in the same order."""
    trace_id, span_id, parent, start, end, kind = _checked(
        raw.traceId, raw.spanId, raw.parentSpanId, raw.startTimeUnixNano, raw.endTimeUnixNano,
        raw.kind)
    written = bytes(raw.status)
    status = _STATUS_OF.get(written)
    if status is None:
        status = _status(_parse(written) if written else _NOTHING)
        if len(_STATUS_OF) < 64:  # the few ways a status is written
            _STATUS_OF[written] = status
    return span_of(trace_id, span_id, name, parent, start, end, status, kind, service, version,
                   _typed_attributes(raw.attributes, keys) if raw.attributes and
                   (keys is None or keys) else {}, None)


def _typed_attributes(raw: msgspec.Raw, keys: frozenset[str] | None) -> dict[str, Any]:
    """`_attributes` of a span's raw attribute list: only the values of `keys` are parsed."""
    try:
        items = _KEY_VALUES.decode(raw)
    except msgspec.DecodeError:  # the lenient pass says what is wrong, or that it is empty
        loaded = _parse(raw)
        return _attributes(loaded, keys) if loaded else {}
    attributes: dict[str, Any] = {}
    for item in items:
        key = item.key
        if keys is not None and key not in keys:
            continue
        try:
            value = _value(_parse(item.value))
        except ValueError as exc:
            raise ValueError(f"attribute {key!r}: {exc}") from None
        if value is not _EMPTY:
            attributes[key] = value
    return attributes


# --- the lenient pass (orjson) ---------------------------------------------------------------

def _decode(doc: Any, projection: Projection, bad: list[str], resource_key: str | None,
            bare: set[str] | None, bare_window: tuple[int, int]) -> tuple[list[Span], int]:
    """The kept spans and how many the request held. Raise ValueError for a malformed request;
    skip a malformed span, appending why to `bad`."""
    if type(doc) is not dict:
        raise ValueError("not a JSON object")
    key = "resourceSpans" if "resourceSpans" in doc else "batches"  # Tempo says "batches"
    resource_spans = doc.get(key)
    if resource_spans is None:
        if doc:
            raise ValueError("no resourceSpans or batches")
        return [], 0  # an empty request: protobuf's JSON mapping omits empty lists
    if type(resource_spans) is not list:
        raise ValueError(f"{key} is not a list")
    wants, keep = projection.wants_name, projection.attributes_for
    spans: list[Span] = []
    received = 0
    for entry in resource_spans:
        if type(entry) is not dict:
            raise ValueError(f"{key} entry is not an object")
        service, version, extra = _resource(entry.get("resource", _NOTHING), resource_key)
        scopes = entry.get("scopeSpans")
        if scopes is None:
            scopes = entry.get("instrumentationLibrarySpans", [])  # OTLP before 0.15
        if type(scopes) is not list:
            raise ValueError("scopeSpans is not a list")
        for scope in scopes:
            if type(scope) is not dict:
                raise ValueError("scopeSpans entry is not an object")
            raw_spans = scope.get("spans", [])
            if type(raw_spans) is not list:
                raise ValueError("spans is not a list")
            received += len(raw_spans)
            for raw in raw_spans:
                try:
                    span = _span(raw, wants, keep, service, version)
                except ValueError as exc:
                    name = raw.get("name") if type(raw) is dict else None
                    bad.append(f"span {name!r}: {exc}" if type(name) is str else f"span: {exc}")
                    continue
                if span is not None:
                    span.group = extra
                    spans.append(span)
                elif bare is not None:  # not selected: its trace is still known by its id
                    trace_id = _id(raw.get("traceId"), 16)
                    start = _nanos(raw.get("startTimeUnixNano")) or 0
                    if trace_id and bare_window[0] <= start < bare_window[1]:
                        bare.add(trace_id)
    return spans, received


def _resource(resource: Any, resource_key: str | None) -> tuple[str | None, str | None, Any]:
    """A resource's service.name and service.version (each None unless a string), and its
    `resource_key` attribute (None if absent)."""
    if type(resource) is not dict:
        raise ValueError("resource is not an object")
    wanted = _SERVICE if resource_key is None else _SERVICE | {resource_key}
    found = _attributes(resource.get("attributes", []), wanted)
    service, version = found.get("service.name"), found.get("service.version")
    return (service if type(service) is str else None,
            version if type(version) is str else None,
            found.get(resource_key) if resource_key is not None else None)


def _span(raw: Any, wants: Callable[[str], bool],
          keep_for: Callable[[str], frozenset[str] | None],
          service: str | None, version: str | None) -> Span | None:
    """One span, or None when the projection drops it (BeTrace's own violation spans come
    through, to be counted); ValueError says what is malformed."""
    if type(raw) is not dict:
        raise ValueError("not an object")
    name = raw.get("name", "")
    if type(name) is not str:
        raise ValueError("name is not a string")
    if not wants(name) and name != VIOLATION_SPAN:
        return None
    trace_id, span_id, parent, start, end, kind = _checked(
        raw.get("traceId"), raw.get("spanId"), raw.get("parentSpanId"),
        raw.get("startTimeUnixNano"), raw.get("endTimeUnixNano"), raw.get("kind", 0))
    status = _status(raw.get("status", _NOTHING))
    attributes = raw.get("attributes")
    keep = keep_for(name)
    return span_of(trace_id, span_id, name, parent, start, end, status, kind, service, version,
                   _attributes(attributes, keep) if attributes and (keep is None or keep)
                   else {}, None)


def _status(status: Any) -> str:
    """A Status object's code as its name."""
    code = status.get("code", 0) if type(status) is dict else None
    name = _STATUSES.get(code) if type(code) in (int, str) else None
    if name is None:
        raise ValueError(f"invalid status {_short(status)}")
    return name


def _checked(raw_trace: Any, raw_span: Any, raw_parent: Any, raw_start: Any, raw_end: Any,
             kind_code: Any) -> tuple[str, str, str, int, int, str]:
    """A span's ids, times and kind from JSON, each checked (ValueError says which is not
    valid) before its status and attributes are."""
    trace_id = _id(raw_trace, 16)
    if not trace_id:
        raise ValueError(f"invalid traceId {_short(raw_trace)}")
    span_id = _id(raw_span, 8)
    if not span_id:
        raise ValueError(f"invalid spanId {_short(raw_span)}")
    parent = _id(raw_parent, 8) if raw_parent else ""  # all zeros, as some exporters write: ""
    if parent is None:
        raise ValueError(f"invalid parentSpanId {_short(raw_parent)}")
    start, end = _nanos(raw_start), _nanos(raw_end)
    if start is None or end is None:
        raise ValueError("invalid startTimeUnixNano or endTimeUnixNano")
    kind = _KINDS.get(kind_code) if type(kind_code) in (int, str) else None
    if kind is None:
        raise ValueError(f"invalid kind {_short(kind_code)}")
    return trace_id, span_id, parent, start, end, kind


def _id(raw: Any, size: int) -> str | None:
    """Lowercase hex of a `size`-byte id sent as hex (OTLP JSON) or base64 (protobuf's JSON
    mapping, Tempo); "" for the all-zero (invalid) id, None for anything else."""
    if type(raw) is not str:
        return None
    if len(raw) == 2 * size:
        if raw.strip(_HEX):
            raw = raw.lower()
            if raw.strip(_HEX):
                return None
    else:
        try:
            data = decode_base64(raw)
        except ValueError:
            return None
        if len(data) != size:
            return None
        raw = data.hex()
    return raw if raw.strip("0") else ""


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not: protobuf's JSON mapping accepts all four."""
    return base64.b64decode(text.translate(_URLSAFE_TO_STD) + "=" * (-len(text) % 4), validate=True)


def _nanos(raw: Any) -> int | None:
    """A fixed64 timestamp: a decimal string in OTLP JSON, a number from lenient writers."""
    if type(raw) is str and raw.isascii() and raw.isdigit():
        return int(raw)
    if type(raw) is int and raw >= 0:
        return raw
    return 0 if raw is None else None


def _attributes(items: Any, keep: frozenset[str] | None) -> dict[str, Any]:
    """A KeyValue list as a dict, keeping only `keep` keys (all when None); empty values dropped."""
    if type(items) is not list:
        raise ValueError("attributes is not a list")
    out: dict[str, Any] = {}
    for item in items:
        key = item.get("key") if type(item) is dict else None
        if type(key) is not str:
            raise ValueError("attribute without a string key")
        if keep is not None and key not in keep:
            continue
        try:
            value = _value(item.get("value"))
        except ValueError as exc:
            raise ValueError(f"attribute {key!r}: {exc}") from None
        if value is not _EMPTY:
            out[key] = value
    return out


def _value(raw: Any) -> Any:
    """Decode an AnyValue to its Python value, or _EMPTY when none is set."""
    if raw is None or raw == _NOTHING:
        return _EMPTY
    if type(raw) is not dict or len(raw) != 1:
        raise ValueError(f"invalid value {_short(raw)}")
    ((field, inner),) = raw.items()
    kind = type(inner)
    if field == "stringValue":
        if kind is str:
            return inner
    elif field == "intValue":  # int64 is a decimal string in OTLP JSON
        if kind is int:
            return inner
        if kind is str and inner.removeprefix("-").isdigit() and inner.isascii():
            return int(inner)
    elif field == "boolValue":
        if kind is bool:
            return inner
    elif field == "doubleValue":
        if kind is float or kind is int or inner in ("NaN", "Infinity", "-Infinity"):
            return float(inner)  # those three strings are how protobuf's JSON mapping writes them
    elif field == "arrayValue":
        values = inner.get("values", []) if kind is dict else None
        if type(values) is list:
            out = []
            for item in values:  # a loop, not a comprehension: one frame per nesting level
                item = _value(item)
                out.append(None if item is _EMPTY else item)
            return tuple(out)
    elif field == "kvlistValue":
        if kind is dict:
            return _attributes(inner.get("values", []), None)
    elif field == "bytesValue":
        if kind is str:
            try:
                return decode_base64(inner)
            except ValueError:
                pass
    else:
        raise ValueError(f"unknown value field {field!r}")
    raise ValueError(f"invalid {field} {_short(inner)}")


def _short(raw: Any) -> str:
    """A value's repr, cut short enough for an error line."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."

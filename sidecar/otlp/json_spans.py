"""OTLP JSON to spans: an ExportTraceServiceRequest as an OTLP/HTTP body, a Tempo answer, or a
line of the Collector file exporter's output (`read_requests` streams those: one request per
line, or one pretty-printed over many lines).

The `Projection` drops unwanted spans before their attributes are decoded. A malformed line or
span is skipped and reported (an `InputError` for a file), never fatal, so the caller can say
exactly which data went unchecked.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import IO, Any

import orjson

from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import KINDS, STATUSES, Projection, Span, span_of
from sidecar.otlp.decoded import Decoded, SpanFilter

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_HEX = "0123456789abcdef"
_URLSAFE_TO_STD = str.maketrans("-_", "+/")
_KINDS: dict[int | str, str] = {**dict(enumerate(KINDS)), **{f"SPAN_KIND_{k}": k for k in KINDS}}
_STATUSES: dict[int | str, str] = {
    **dict(enumerate(STATUSES)), **{f"STATUS_CODE_{s}": s for s in STATUSES}
}
_SERVICE_NAME = frozenset(("service.name",))
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


def spans_from_request(
    doc: Any, projection: Projection | None = None, rejected: list[str] | None = None,
    resource_key: str | None = None,
) -> list[Span]:
    """The spans of one decoded ExportTraceServiceRequest (a file line, or an OTLP/HTTP JSON body).

    A malformed request raises ValueError. A malformed span is skipped and its reason appended to
    `rejected` (what OTLP's partial-success response reports); without a list it raises ValueError.
    With `resource_key`, each span's `group` is its resource's value of that attribute (None if
    absent).
    """
    bad: list[str] = [] if rejected is None else rejected
    spans, _ = _decode(doc, projection, bad, resource_key)
    if rejected is None and bad:
        raise ValueError(bad[0])
    return spans


def read_requests(stream: IO[bytes], report: Callable[[int, str], None]
                  ) -> Iterator[tuple[int, Any]]:
    """Each parsed JSON request of an open stream with the line it starts on: line by line, or the
    whole input at once if its first line opens a document. A line that is not JSON is reported
    and skipped; errors of the stream itself (bad compressed data) are the caller's."""
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
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for number, line in lines:
        if line.isspace():
            continue
        try:
            doc = loads(line)
        except decode_error as exc:
            report(*_locate(exc, number, line))
            continue
        yield number, doc


def _locate(exc: orjson.JSONDecodeError, first: int, text: bytes) -> tuple[int, str]:
    """Line and reason of a JSON error in `text`, which starts at line `first`."""
    line, last = first + exc.lineno - 1, first + text.rstrip().count(b"\n")
    if line > last:  # orjson places "unexpected end of data" past the final newline
        return last, f"invalid JSON: {exc.msg}"
    return line, f"invalid JSON at column {exc.colno}: {exc.msg}"


def decode_json_request(doc: Any, keep: SpanFilter) -> Decoded:
    """One decoded ExportTraceServiceRequest (an OTLP/HTTP JSON body, a file line, a Tempo
    answer) as `otlp.protobuf.ProtobufDecoder` decodes protobuf: the same spans kept, with the
    same attributes, the same counts, the same ids held. A malformed request raises ValueError."""
    out = Decoded()
    since, until = keep.since_ns, keep.until_ns
    bare: set[str] | None = set() if keep.projection.trace_ids else None
    # our own violation spans come through, to be counted as such rather than as not selected
    spans, out.received = _decode(doc, keep.projection, out.invalid, keep.resource_key, bare,
                                  (since, until), own=True)
    for span in spans:
        if span.name == VIOLATION_SPAN:
            out.own += 1
        elif since <= span.start_ns < until:
            out.batch.setdefault(span.trace_id, []).append(span)
    out.not_selected = out.received - len(out.invalid) - out.own - sum(map(len, out.batch.values()))
    if bare:
        out.bare_trace_ids = bare - out.batch.keys()
    return out


def _decode(doc: Any, projection: Projection | None, bad: list[str],
            resource_key: str | None = None, bare: set[str] | None = None,
            bare_window: tuple[int, int] = (0, 2**64), own: bool = False
            ) -> tuple[list[Span], int]:
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
    wants = projection.wants_name if projection is not None else None
    keep = projection.attributes_for if projection is not None else None
    spans: list[Span] = []
    received = 0
    for entry in resource_spans:
        if type(entry) is not dict:
            raise ValueError(f"{key} entry is not an object")
        resource = entry.get("resource", _NOTHING)
        if type(resource) is not dict:
            raise ValueError("resource is not an object")
        wanted = _SERVICE_NAME if resource_key is None else _SERVICE_NAME | {resource_key}
        found = _attributes(resource.get("attributes", []), wanted)
        service = found.get("service.name")
        if type(service) is not str:
            service = None
        extra = found.get(resource_key) if resource_key is not None else None
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
                    span = _span(raw, wants, keep, service, own)
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


def _span(raw: Any, wants: Callable[[str], bool] | None,
          keep_for: Callable[[str], frozenset[str] | None] | None,
          service: str | None, own: bool = False) -> Span | None:
    """One span, or None when the projection drops it (BeTrace's own violation spans come
    through with `own`); ValueError says what is malformed."""
    if type(raw) is not dict:
        raise ValueError("not an object")
    name = raw.get("name", "")
    if type(name) is not str:
        raise ValueError("name is not a string")
    if wants is not None and not wants(name) and not (own and name == VIOLATION_SPAN):
        return None
    trace_id = _id(raw.get("traceId"), 16)
    if not trace_id:
        raise ValueError(f"invalid traceId {_short(raw.get('traceId'))}")
    span_id = _id(raw.get("spanId"), 8)
    if not span_id:
        raise ValueError(f"invalid spanId {_short(raw.get('spanId'))}")
    parent = raw.get("parentSpanId")
    parent = _id(parent, 8) if parent else ""  # all zeros, as some exporters write, is "" too
    if parent is None:
        raise ValueError(f"invalid parentSpanId {_short(raw.get('parentSpanId'))}")
    start = _nanos(raw.get("startTimeUnixNano"))
    end = _nanos(raw.get("endTimeUnixNano"))
    if start is None or end is None:
        raise ValueError("invalid startTimeUnixNano or endTimeUnixNano")
    kind_code = raw.get("kind", 0)
    kind = _KINDS.get(kind_code) if type(kind_code) in (int, str) else None
    if kind is None:
        raise ValueError(f"invalid kind {_short(kind_code)}")
    status = raw.get("status", _NOTHING)
    code = status.get("code", 0) if type(status) is dict else None
    status_name = _STATUSES.get(code) if type(code) in (int, str) else None
    if status_name is None:
        raise ValueError(f"invalid status {_short(status)}")
    attributes = raw.get("attributes")
    keep = keep_for(name) if keep_for is not None else None
    return span_of(
        trace_id, span_id, name, parent, start, end, status_name, kind, service,
        _attributes(attributes, keep) if attributes and (keep is None or keep) else {}, None)


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
            data = _base64(raw)
        except ValueError:
            return None
        if len(data) != size:
            return None
        raw = data.hex()
    return raw if raw.strip("0") else ""


def _base64(text: str) -> bytes:
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
                return _base64(inner)
            except ValueError:
                pass
    else:
        raise ValueError(f"unknown value field {field!r}")
    raise ValueError(f"invalid {field} {_short(inner)}")


def _short(raw: Any) -> str:
    """A value's repr, cut short enough for an error line."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."

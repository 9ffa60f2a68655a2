"""The span record every stage shares, and the trace view rules evaluate.

A `Span` is the compact projection the design calls for: ids, name, times, status, kind, the
resource's `service.name` and `service.version`, and the attributes rules read. Ingest (OTLP
protobuf or JSON) builds them; the rule engine only reads them. Attribute values keep their
OTLP types: str, bool, int, float, or a tuple for arrays (kvlists become dicts, bytes stay
bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

STATUSES = ("UNSET", "OK", "ERROR")
KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")


class Span:
    """One span, reduced to what rules and signals need."""

    __slots__ = (
        "trace_id", "span_id", "parent_span_id", "name", "start_ns", "end_ns",
        "status", "kind", "service", "version", "attributes", "group",
    )

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        name: str,
        *,
        parent_span_id: str = "",
        start_ns: int = 0,
        end_ns: int = 0,
        status: str = "UNSET",
        kind: str = "INTERNAL",
        service: str | None = None,
        version: str | None = None,
        attributes: dict[str, Any] | None = None,
        group: Any = None,
    ) -> None:
        self.trace_id = trace_id  # 32 lowercase hex
        self.span_id = span_id  # 16 lowercase hex
        self.parent_span_id = parent_span_id  # "" for a root span
        self.name = name
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.status = status  # one of STATUSES
        self.kind = kind  # one of KINDS
        self.service = service  # resource attribute service.name
        self.version = version  # resource attribute service.version (signals carry both)
        self.attributes = attributes if attributes is not None else {}
        # replay --group-by: its resource's value of that attribute (rules never read it)
        self.group = group

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def __repr__(self) -> str:
        return f"Span({self.name!r}, trace={self.trace_id[:8]}, span={self.span_id}, {self.attributes!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Span):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in Span.__slots__)

    __hash__ = None  # type: ignore[assignment]


def span_of(trace_id: str, span_id: str, name: str, parent_span_id: str, start_ns: int,
            end_ns: int, status: str, kind: str, service: str | None,
            version: str | None, attributes: dict[str, Any], group: Any) -> Span:
    """A Span from every field, positionally: what decoders call per span. A module function
    with one statement per slot costs half what keyword parsing in `Span(...)`, a classmethod
    or a tuple assignment of the slots would (measured on Python 3.11)."""
    span = _new(Span)
    span.trace_id = trace_id
    span.span_id = span_id
    span.name = name
    span.parent_span_id = parent_span_id
    span.start_ns = start_ns
    span.end_ns = end_ns
    span.status = status
    span.kind = kind
    span.service = service
    span.version = version
    span.attributes = attributes
    span.group = group
    return span


_new = object.__new__

# Span's slots as their descriptors, in span_of's order: how the C extensions (the protobuf
# decoder, replay's spill) set a new span's fields
SLOT_DESCRIPTORS = tuple(Span.__dict__[name] for name in (
    "trace_id", "span_id", "name", "parent_span_id", "start_ns", "end_ns", "status", "kind",
    "service", "version", "attributes", "group"))
NO_ATTRIBUTES: dict[str, Any] = {}  # shared by every span that keeps none: never mutated

SPAN_OVERHEAD_BYTES = 64  # ids, times, status and kind: what a stored span costs besides its text
_SCALAR_BYTES = 8  # a bool, int or float value
_SCALARS = frozenset((bool, int, float))


def stored_bytes(span: Span) -> int:
    """What a span counts against its trace's byte budget (max_trace_bytes): the UTF-8 bytes of
    its name, service, version, attribute keys and values (inside arrays and kvlists too, and bytes
    values as they are: any of them can be the 10 MB one), other values a fixed size, plus a
    fixed overhead. Taken from the span, not from a store's encoding, so every store agrees.
    It runs for every stored span: the short strings are measured as one, and the common
    values without a call."""
    attributes = span.attributes
    size = SPAN_OVERHEAD_BYTES + _text_bytes(
        span.name + (span.service or "") + (span.version or "") + "".join(attributes))
    for value in attributes.values():
        kind = type(value)
        if kind is str:
            size += len(value) if value.isascii() else _utf8_bytes(value)
        elif kind in _SCALARS:
            size += _SCALAR_BYTES
        else:
            size += _value_bytes(value)
    return size


def _text_bytes(text: str) -> int:
    # isascii() reads a flag in CPython: most text is never encoded just to be measured
    return len(text) if text.isascii() else _utf8_bytes(text)


def _utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _value_bytes(value: Any) -> int:
    if isinstance(value, str):
        return _text_bytes(value)
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(map(_value_bytes, value))
    if isinstance(value, dict):
        return sum(_text_bytes(key) + _value_bytes(item) for key, item in value.items())
    return _SCALAR_BYTES


class Trace:
    """All spans of one trace_id, indexed by name once so a rule only touches the spans it names."""

    __slots__ = ("trace_id", "spans", "by_name", "_glob_cache", "_children")

    def __init__(self, trace_id: str, spans: Iterable[Span]) -> None:
        self.trace_id = trace_id
        self.spans: list[Span] = list(spans)
        self.by_name: dict[str, list[Span]] = {}
        # made on first use: most traces are judged by exact names, without a glob or `under`
        self._glob_cache: dict[str, list[Span]] | None = None
        self._children: dict[str, list[Span]] | None = None
        self._index(self.spans)

    def add(self, spans: Iterable[Span]) -> None:
        """Append spans as they arrive, keeping the name index current."""
        spans = list(spans)
        self.spans += spans
        self._index(spans)
        self._glob_cache = self._children = None

    def _index(self, spans: list[Span]) -> None:
        by_name = self.by_name
        for span in spans:
            bucket = by_name.get(span.name)
            if bucket is None:
                by_name[span.name] = [span]
            else:
                bucket.append(span)

    def without_repeats(self) -> Trace:
        """The trace with each span id once (its first copy). A collector retries an Export
        whose answer it did not get, and a store or a file exporter may then keep both copies:
        counting them twice would make `count(x) > n` rules cry wolf."""
        spans = self.spans
        if len(spans) < 2 or len({span.span_id for span in spans}) == len(spans):
            return self
        seen: set[str] = set()
        return Trace(self.trace_id, [span for span in spans
                                     if span.span_id not in seen and not seen.add(span.span_id)])

    def matching(self, glob_key: str, matches: Any) -> list[Span]:
        """Spans whose name satisfies `matches` (a compiled glob); cached per trace under glob_key."""
        cache = self._glob_cache
        if cache is None:
            cache = self._glob_cache = {}
        found = cache.get(glob_key)
        if found is None:
            found = cache[glob_key] = [s for name, bucket in self.by_name.items()
                                       if matches(name) for s in bucket]
        return found

    def descends_from(self, ancestor: Span) -> set[str]:
        """The span ids under `ancestor` at any depth, through parent_span_id links among the
        trace's span ids (a cycle ends the walk; a span is not under itself)."""
        children = self._children
        if children is None:
            children = {}
            for span in self.spans:
                if span.parent_span_id:
                    children.setdefault(span.parent_span_id, []).append(span)
            self._children = children
        found: set[str] = set()
        stack = [ancestor.span_id]
        while stack:
            for child in children.get(stack.pop(), ()):
                if child.span_id not in found:
                    found.add(child.span_id)
                    stack.append(child.span_id)
        found.discard(ancestor.span_id)
        return found

    def __iter__(self) -> Iterator[Span]:
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)


class Projection:
    """What the loaded rules can read: spans whose name no rule selects, and attributes no rule
    reads or copies into a signal, are dropped right after decoding (the main speed lever).
    `attributes_for(name)` is the set to keep on spans of that name (None keeps everything).
    `trace_ids`: some rule fires on a trace without its spans, so the ids of traces none of whose
    spans are selected are kept too (an id costs far less than a trace). `names`: the
    span names selected, when that is exactly a set (no glob, no `under`, which follows parent links
    through every span, and no `trace_ids`): a decoder may skip every other span unparsed."""

    __slots__ = ("wants_name", "attributes", "attributes_for", "trace_ids", "names")

    def __init__(self, wants_name: Any, attributes: frozenset[str] | None,
                 attributes_for: Any = None, trace_ids: bool = False,
                 names: frozenset[str] | None = None) -> None:
        self.wants_name = wants_name  # Callable[[str], bool]
        self.attributes = attributes  # None keeps every attribute; the union over names
        self.attributes_for = attributes_for or (lambda name: attributes)
        self.trace_ids = trace_ids
        self.names = None if trace_ids else names

    @classmethod
    def everything(cls) -> Projection:
        return cls(lambda name: True, None)

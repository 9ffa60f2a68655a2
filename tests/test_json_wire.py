"""The C decoder of OTLP JSON requests (`sidecar.otlp._wire.decode_json`, the fast path of
`json_spans.decode_json`) against the Python passes it stands in for (`decode_json_python`, the
reference). Requests in the common shape are decoded by the C itself (it must not give up on
them), with the same spans (every slot, values compared with their types), counts and ids as the
reference; on requests outside that shape, damaged bytes, arbitrary bytes and arbitrary JSON the
C gives the same or gives up, so `decode_json` answers, or raises, exactly as the reference does.
Under AddressSanitizer the C reads nothing it should not."""

from __future__ import annotations

import base64
import json
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from processes import fuzz_sanitized
from test_wire import RULES

from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import KINDS, STATUSES, Projection, Span
from sidecar.otlp import _wire, json_spans
from sidecar.otlp.decoded import Decoded, SpanFilter
from sidecar.otlp.json_spans import decode_json, decode_json_python
from sidecar.rules.loading import load_rules_text

T = TypeVar("T")
BOUNDED = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Generated requests are not shrunk: shrinking one drawn piece by piece took the five minutes
# Hypothesis allows and got nowhere. A failure prints the whole request, and the filter.
UNSHRUNK = settings(BOUNDED, phases=[Phase.explicit, Phase.reuse, Phase.generate])

# --- what is decoded: filters, and the outcomes compared ------------------------------------------

RETRY_RULE = """rules:
  - id: payment-retry-idempotency
    severity: critical
    for_each: payment.charge.where(attempt > 1)
    never: payment.charge.where(cart.id == this.cart.id and payment_intent_id != this.payment_intent_id)
"""
SINCE, UNTIL = 1_700_000_000_000_000_000, 1_700_000_000_000_001_000  # the window filtered on


def _filters() -> list[SpanFilter]:
    """Exact names (unselected spans only walked); a glob keeping every attribute (own spans'
    too); --group-by service.version, another resource key, and service.name (which is the
    span's service); a window, with own spans reading an attribute and the empty name selected;
    payments.yaml's retry rule, which reads nothing of own spans."""
    exact = load_rules_text(RULES).projection()
    assert exact.names == {"payment.charge", "auth.check"} and not exact.trace_ids
    glob = Projection(lambda name: name.startswith("pay"), None, names=None)
    reads = {"payment.charge": frozenset({"k", "amount"}), VIOLATION_SPAN: frozenset({"k"})}
    own = Projection(lambda name: name in ("payment.charge", ""), frozenset({"k", "amount"}),
                     lambda name: reads.get(name, frozenset()),
                     names=frozenset({"payment.charge", ""}))
    return [SpanFilter(exact), SpanFilter(glob), SpanFilter.of(exact, group_by="service.version"),
            SpanFilter.of(glob, group_by="region"), SpanFilter.of(exact, group_by="service.name"),
            SpanFilter.of(own, since_ns=SINCE, until_ns=UNTIL),
            SpanFilter(load_rules_text(RETRY_RULE).projection())]


FILTERS = _filters()


def typed(value: Any) -> Any:
    """`value` compared with its type: 1, 1.0 and True differ, so do 0.0 and -0.0; NaN is NaN."""
    kind = type(value)
    if kind is float:
        return "float", value.hex()
    if kind is dict:
        return "dict", [(key, typed(item)) for key, item in value.items()]
    if kind in (tuple, list):
        return kind.__name__, [typed(item) for item in value]
    return kind.__name__, value


def summary(decoded: Decoded) -> tuple[Any, ...]:
    """All of a `Decoded`: traces in order, their spans slot by slot, counts, reasons, ids."""
    return ([(trace, [[(slot, typed(getattr(span, slot))) for slot in Span.__slots__]
                      for span in spans]) for trace, spans in decoded.batch.items()],
            decoded.received, decoded.not_selected, decoded.own, decoded.invalid,
            sorted(decoded.bare_trace_ids))


def outcome(decode: Callable[[bytes, SpanFilter], Decoded], data: bytes, keep: SpanFilter
            ) -> tuple[Any, ...]:
    """What `decode` gives, or the type and message of what it raises."""
    try:
        decoded = decode(data, keep)
    except Exception as exc:  # orjson's error, ValueError, RecursionError, OverflowError...
        return "raises", type(exc), str(exc)
    return "gives", summary(decoded)


def c_takes(data: bytes, keep: SpanFilter) -> bool:
    """Whether `_wire.decode_json` decodes `data` itself (rather than give up)."""
    plan = json_spans._c_plan(keep)
    assert plan is not None
    return _wire.decode_json(data, *plan, {}, {}) is not None


def agree(data: bytes, keep: SpanFilter) -> bool:
    """Assert `decode_json` gives what the reference gives; whether the C decoded it."""
    expected = outcome(decode_json_python, data, keep)
    assert outcome(decode_json, data, keep) == expected, \
        f"{data!r} with filter {FILTERS.index(keep) if keep in FILTERS else keep}"
    return c_takes(data, keep)


# --- JSON written by hand: layouts, spellings, members in any order or twice ----------------------

class Lit(str):
    """JSON text written as it is: a number or a string spelled as json.dumps never does."""


class Obj:
    """A JSON object as its members, in order: a key may come twice."""

    __slots__ = ("members",)

    def __init__(self, members: list[tuple[Any, Any]]) -> None:
        self.members = members  # a key is a str, or a Lit spelled with its quotes


@dataclass(frozen=True)
class Layout:
    """How JSON text is laid out: separators, indentation, line ends, escapes."""

    item: str = ","
    colon: str = ":"
    indent: str | None = None  # pretty-printed: one member or element a line
    newline: str = "\n"
    ascii: bool = True  # non-ASCII text as \u escapes (surrogate pairs past U+FFFF)


LAYOUTS = [Layout(), Layout(", ", ": "), Layout(",", ": ", "  "),
           Layout(",", " :\t", "\t", "\r\n", ascii=False), Layout(" , ", ": ", ascii=False)]


def write(value: Any, layout: Layout, depth: int = 0) -> str:
    """`value` as JSON text in `layout`."""
    if isinstance(value, Lit):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=layout.ascii)
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, (dict, Obj)):
        members = value.items() if isinstance(value, dict) else value.members
        parts = [write(key, layout) + layout.colon + write(item, layout, depth + 1)
                 for key, item in members]
        opening, closing = "{", "}"
    else:
        parts = [write(item, layout, depth + 1) for item in value]
        opening, closing = "[", "]"
    if not parts:
        return opening + closing
    if layout.indent is None:
        return opening + layout.item.join(parts) + closing
    pad = layout.newline + layout.indent * (depth + 1)
    return (opening + pad + ("," + pad).join(parts) + layout.newline + layout.indent * depth
            + closing)


def spelled(text: str, how: int) -> Lit:
    """`text` as a JSON string with escapes json.dumps does not write: every character as \\uXXXX
    (upper-case hex, pairs past U+FFFF), or "/" as "\\/" and the rest as json.dumps writes it."""
    if how == 0:
        units = text.encode("utf-16-be")
        return Lit('"' + "".join(f"\\u{units[i]:02X}{units[i + 1]:02X}"
                                 for i in range(0, len(units), 2)) + '"')
    return Lit(json.dumps(text, ensure_ascii=False).replace("/", "\\/"))


# --- requests drawn from a source: Hypothesis, or a seeded random (the sanitizer's run) -----------

class Source(Protocol):
    """Where a request's choices come from."""

    def integer(self, low: int, high: int) -> int: ...
    def text(self) -> str: ...
    def double(self) -> float: ...
    def binary(self, size: int) -> bytes: ...


SPECIAL = '"\\/\b\f\n\r\t\x00\x01\x1f\x7f\u2028\xe9\u20ac\U0001f600\U0010ffff'
TEXT = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(SPECIAL)), max_size=8)


class Drawn:
    """Hypothesis's draws."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def text(self) -> str:
        return self.draw(TEXT)

    def double(self) -> float:
        return self.draw(st.floats(allow_nan=False, allow_infinity=False))

    def binary(self, size: int) -> bytes:
        return self.draw(st.binary(min_size=size, max_size=size))


class Seeded:
    """A seeded random's draws."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def text(self) -> str:
        rng = self.rng
        return "".join(rng.choice((rng.choice(SPECIAL), chr(rng.randint(0x20, 0x7E)),
                                   chr(rng.randint(0, 0xD7FF)), chr(rng.randint(0xE000, 0x10FFFF))))
                       for _ in range(rng.randint(0, 8)))

    def double(self) -> float:
        value = struct.unpack("<d", self.rng.randbytes(8))[0]
        return value if value - value == 0 else 0.5  # finite

    def binary(self, size: int) -> bytes:
        return self.rng.randbytes(size)


NAMES = ["payment.charge", "auth.check", "noise", "", "päyment", "payment.charg", VIOLATION_SPAN,
         "pay" + "ü" * 150]  # the glob selects the last, a name longer than any buffer for one
KEYS = ["k", "amount", "attempt", "region", "service.version", "z", "long." + "x" * 300]
INT18 = 10**18 - 1


class Forms:
    """Draws one request: in the common shape the C decodes itself when `accepted`; else now and
    then (one site in `odd_in`, per request) a form it gives up on, a span the reference refuses
    or a request it raises on."""

    def __init__(self, src: Source, accepted: bool) -> None:
        self.src = src
        self.odd_in = 0 if accepted else src.integer(0, 2) and (40, 8)[src.integer(0, 1)]
        # a few traces, whose spans come interleaved, across resources and in either case; their
        # ids share a half, so a cache of the last one must compare whole ids
        first = src.binary(16)
        self.traces = [first, first[:8] + src.binary(8), src.binary(8) + first[8:]][
            :src.integer(1, 3)]

    def pick(self, options: Sequence[T]) -> T:
        return options[self.src.integer(0, len(options) - 1)]

    def some(self, most: int) -> range:
        """At least one, now and then none."""
        return range(0 if self.chance(10) else self.src.integer(1, most))

    def chance(self, one_in: int) -> bool:
        return self.src.integer(1, one_in) == 1

    def odd(self) -> bool:
        return bool(self.odd_in) and self.chance(self.odd_in)

    def shuffled(self, members: list[T]) -> list[T]:
        for i in range(len(members) - 1, 0, -1):
            j = self.src.integer(0, i)
            members[i], members[j] = members[j], members[i]
        return members

    def obj(self, members: list[tuple[Any, Any]]) -> Obj:
        """Members in the usual order; now and then shuffled, one twice, or a key escaped."""
        if members and self.odd():
            how = self.src.integer(0, 2)
            if how == 0:
                members = self.shuffled(members)
            elif how == 1:
                members.insert(self.src.integer(0, len(members)), self.pick(members))
            else:
                at = self.src.integer(0, len(members) - 1)
                key, item = members[at]
                members[at] = (spelled(key, self.src.integer(0, 1)), item)
        return Obj(members)

    # values ---------------------------------------------------------------------------------------

    def string(self) -> Any:
        if self.odd():  # a lone surrogate: no JSON parser here accepts one
            return Lit(self.pick(['"\\ud800"', '"a\\udc00"', '"\\udc00\\ud800"', '"\\uD83Dx"']))
        text = self.src.text()
        if self.chance(12):  # longer than any buffer the C might keep for one
            text = (text or '\\"é') * self.src.integer(20, 200)
        return spelled(text, self.src.integer(0, 1)) if self.chance(4) else text

    def double(self) -> Any:
        how = self.src.integer(0, 5)
        if how == 0:
            return self.pick(["NaN", "Infinity", "-Infinity", Lit("-0"), 0, -1, 2**53 + 1])
        if how == 1:
            return self.src.integer(-10**15, 10**15)
        value = self.src.double()
        return Lit(format(value, (".17e", ".17E")[how % 2])) if how < 4 else value

    def value(self, read: bool = True) -> Any:
        """An AnyValue; an array, kvlist or bytes where none reads it (`read` False)."""
        how = self.src.integer(0, 7 if read else 9)
        if how < 2:
            return {"stringValue": self.string()}
        if how == 2:
            number = self.src.integer(-INT18, INT18)  # past 18 digits the C gives up
            return {"intValue": self.pick([str(number), number])}
        if how == 3:
            return {"boolValue": self.pick([True, False])}
        if how == 4:
            return {"doubleValue": self.double()}
        if how == 5:
            return self.pick([{}, None])
        if how in (6, 7):
            return {"stringValue": self.pick(["v", "v2", "", "ü"])}
        return self.pick([
            {"arrayValue": {"values": [{"intValue": "1"}, {"stringValue": "x"}]}},
            {"arrayValue": {}}, {"bytesValue": "AAE="},
            {"kvlistValue": {"values": [{"key": "a", "value": {"boolValue": True}}]}}])

    def odd_value(self) -> Any:
        return self.pick([
            {"arrayValue": {"values": [{"intValue": 3}, {}]}}, {"bytesValue": "AAEC"},
            {"kvlistValue": {"values": []}}, {"intValue": "123456789012345678901234"},
            {"intValue": 2**64}, {"intValue": 2**63 - 1}, {"intValue": str(-2**63)},
            {"intValue": str(10**18)}, {"intValue": Lit("-0")}, {"intValue": "-0"},
            {"intValue": "007"}, {"intValue": "+1"}, {"intValue": 1.5}, {"intValue": "x"},
            {"doubleValue": Lit("1e400")}, {"doubleValue": Lit("-1E400")},
            {"doubleValue": Lit("1e-400")}, {"doubleValue": Lit("123456789012345678901234")},
            {"doubleValue": Lit("0.1000000000000000055511151231257827021181583404541015625")},
            {"doubleValue": "nan"}, {"doubleValue": True}, {"stringValue": 5},
            {"boolValue": "true"}, {"bogus": 1}, {"stringValue": "a", "intValue": 1},
            Obj([("stringValue", "a"), ("stringValue", "b")]), 5, [], "x",
            {"stringValue": Lit('"\\ud800"')}])

    def attribute(self, key: str, read: bool) -> Any:
        if self.odd():
            how = self.src.integer(0, 4)
            if how == 0:
                return {"key": key, "value": self.odd_value()}
            if how == 1:
                return self.pick([{"key": key}, {"value": {"stringValue": "v"}},
                                  {"key": 5, "value": {}}, "x", None])
            if how == 2:
                return Obj([("value", self.value(read)), ("key", key)])
            if how == 3:
                return {"key": self.pick(["ü", 'a"b', "k\\"]), "value": self.value(read)}
        return self.obj([("key", key), ("value", self.value(read))])

    def attributes(self, keys: Sequence[str], read: bool = True) -> Any:
        if self.odd():
            return self.pick([None, {}, "x", 5, [None]])
        return [self.attribute(self.pick(keys), read)
                for _ in self.some(4 if self.src.integer(0, 19) else 40)]

    def junk(self, depth: int = 0) -> Any:
        """An unknown member's value: any JSON, shallow."""
        how = self.src.integer(0, 6 if depth < 3 else 3)
        if how == 0:
            return self.string()
        if how == 1:
            if self.odd():  # past the largest double
                return self.pick([Lit("1e400"), Lit("-2E308")])
            return self.pick([None, True, False, 0, -7, 1.5e-7, Lit("1E+2"), Lit("-0.0")])
        if how == 2:
            return self.src.double()
        if how == 3:
            return self.pick(["payment.charge", "5b8efff798038103d269b633813fc60c", {}, []])
        if how < 6:
            return [self.junk(depth + 1) for _ in self.some(3)]
        return Obj([(self.pick(["traceId", "name", "x", "spans", "attributes"]),
                     self.junk(depth + 1)) for _ in self.some(3)])

    # ids, times, kinds, statuses ------------------------------------------------------------------

    def hex_id(self, size: int) -> Any:
        raw = self.pick(self.traces) if size == 16 and self.src.integer(0, 4) else \
            self.src.binary(size)
        raw = raw if any(raw) else b"\x01" + raw[1:]
        if self.odd():
            return self.pick([
                raw.hex()[:-1] + "A", raw.hex()[:-2], raw.hex() + "0", "z" + raw.hex()[1:],
                base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="),
                "0" * 2 * size, "", None, 5, [raw.hex()], Lit('"' + raw.hex()[:-1] + '\\u0041"')])
        return raw.hex() if self.chance(2) else raw.hex().upper()

    def time(self) -> Any:
        if self.odd():
            return self.pick([Lit("-0"), -1, "-1", "007", " 7", "1.5", Lit("1e3"), Lit("2.0"),
                              str(2**64), 2**64, 10**30, "٣", True, [], "x"])
        number = self.pick([0, 1, SINCE - 1, SINCE, SINCE + 1, UNTIL - 1, UNTIL, 2**64 - 1,
                            self.src.integer(0, 2**64 - 1)])
        return self.pick([str(number), number, None])

    def kind(self) -> Any:
        if self.odd():
            return self.pick([6, 7, -1, Lit("-0"), 2.0, "SERVER", "SPAN_KIND_server", None, True])
        return self.pick([self.src.integer(0, 5), "SPAN_KIND_" + self.pick(KINDS)])

    def status(self) -> Any:
        if self.odd():
            return self.pick([{"code": 5}, {"code": -1}, {"code": None}, {"code": "ERROR"},
                              {"code": 1.0}, None, "x", [], Obj([("code", 1), ("code", 2)])])
        code = self.src.integer(0, 2)
        return self.pick([{}, {"code": code}, {"code": "STATUS_CODE_" + STATUSES[code]},
                          {"code": code, "message": self.string()},
                          {"message": "m", "code": code}])

    # the request --------------------------------------------------------------------------------

    def span(self) -> Obj:
        name = self.pick(NAMES)
        noise = name == "noise"  # no filter selects it: nothing in it is read
        members: list[tuple[Any, Any]] = [("traceId", self.hex_id(16)), ("spanId", self.hex_id(8))]
        if self.chance(3):
            members.append(("traceState", self.string()))
        if not self.chance(3):
            members.append(("parentSpanId", self.pick([self.hex_id(8), "0" * 16]) if not
                            self.odd() else self.pick(["", None, "00", "z" * 16])))
        if self.chance(3):
            members.append(("flags", self.pick([0, 1, 257])))
        members.append(("name", self.pick([name, spelled(name, 0), 'pay"ment', 5, None])
                        if self.odd() else Lit(json.dumps(name, ensure_ascii=False))))
        for field, value in (("kind", self.kind), ("startTimeUnixNano", self.time),
                             ("endTimeUnixNano", self.time)):
            if not self.chance(5):
                members.append((field, value()))
        if not self.chance(4):
            members.append(("attributes", self.attributes(KEYS, read=not noise)))
        if self.chance(3):
            members.append(("droppedAttributesCount", self.pick([0, 3])))
        if self.chance(3):
            members.append(("events", [{"timeUnixNano": "1", "name": self.pick(NAMES),
                                        "attributes": self.attributes(KEYS, read=False)}
                                       for _ in self.some(2)]))
        if self.chance(3):
            members.append(("links", [{"traceId": self.hex_id(16), "spanId": self.hex_id(8),
                                       "traceState": "", "attributes": []}]))
        if self.chance(4):
            members.append((self.pick(["x", "schemaUrl", "droppedLinksCount"]), self.junk()))
        if not self.chance(3):
            members.append(("status", self.status()))
        if noise and self.chance(2):  # nothing is checked in a span no rule selects
            members = [(key, value if key == "name" else self.junk()) for key, value in members]
        return self.obj(members)

    def scope(self, legacy: bool) -> Obj:
        members: list[tuple[Any, Any]] = []
        if self.chance(2):
            members.append(("instrumentationLibrary" if legacy else "scope", {
                "name": self.pick(["", "payment.charge", "io.opentelemetry.jdbc"]),
                "version": "2.1.0", "attributes": self.attributes(["k", "a"], read=False)}))
        if not self.chance(6):
            spans = [self.span() for _ in self.some(5 if self.src.integer(0, 19) else 60)]
            members.append(("spans", spans if not self.odd() else self.pick([None, {}, "x"])))
        if self.chance(4):
            members.append(("schemaUrl", "https://opentelemetry.io/schemas/1.21.0"))
        return self.obj(members)

    def resource(self) -> Any:
        if self.odd():
            return self.pick([None, [], "x", {"attributes": None}, {"attributes": {}}])
        attributes = []
        for _ in self.some(5):
            key = self.pick(["service.name", "service.version", "region", "Region",
                             "deployment.environment"])
            read = key in ("service.name", "service.version", "region")  # (--group-by region)
            attributes.append(self.attribute(key, read) if not self.chance(3) else self.obj([
                ("key", key), ("value", {"stringValue": self.pick(["orders", "v2", "eu", ""])})]))
        members: list[tuple[Any, Any]] = [("attributes", attributes)]
        if self.chance(4):
            members.append(("droppedAttributesCount", 0))
        return self.obj(members)

    def resource_spans(self) -> Obj:
        legacy = self.chance(4)
        scopes = ("instrumentationLibrarySpans" if legacy else "scopeSpans",
                  [self.scope(legacy) for _ in self.some(2)])
        members: list[tuple[Any, Any]] = []
        if not self.chance(5):
            members.append(("resource", self.resource()))
        members.append(scopes)
        if self.chance(4):
            members.append(("schemaUrl", "s"))
        if self.odd():
            how = self.src.integer(0, 2)
            if how == 0:
                members.reverse()  # the resource after its spans
            elif how == 1:
                members.append(("instrumentationLibrarySpans" if not legacy else "scopeSpans",
                                [self.scope(not legacy)]))
            else:
                members.insert(0, (scopes[0], None))
        return self.obj(members)

    def request(self) -> Any:
        key = "batches" if self.chance(4) else "resourceSpans"
        members: list[tuple[Any, Any]] = [(key, [self.resource_spans() for _ in self.some(3)])]
        if self.odd():
            return self.pick([
                Obj([*members, ("batches" if key == "resourceSpans" else "resourceSpans", [])]),
                Obj([(key, None)]), Obj([("x", 1)]), Obj([("x", 1), *members]), Obj([]),
                [], Obj([(key, {})])])
        return self.obj(members)


def request_bytes(src: Source, accepted: bool) -> bytes:
    """One request as bytes (see `Forms`), in one of the `LAYOUTS`."""
    forms = Forms(src, accepted)
    return write(forms.request(), forms.pick(LAYOUTS)).encode()


@st.composite
def requests(draw: st.DrawFn, accepted: bool) -> bytes:
    """`request_bytes` drawn by Hypothesis."""
    return request_bytes(Drawn(draw), accepted)


# --- 1. generated requests --------------------------------------------------------------------

@UNSHRUNK
@given(requests(accepted=True))
def test_requests_in_the_common_shape_are_decoded_in_c_as_the_reference_does(body: bytes
                                                                             ) -> None:
    """Compact or pretty, hex ids in either case, times as strings, numbers or absent, kinds and
    codes as numbers or names, every scalar value with escapes and raw UTF-8, unknown members
    anywhere: the C decodes each one itself, and gives what the reference gives."""
    for keep in FILTERS:
        assert agree(body, keep), f"the C gave up on {body!r} with filter {FILTERS.index(keep)}"


@UNSHRUNK
@given(requests(accepted=False))
def test_any_request_decodes_as_the_reference_does(body: bytes) -> None:
    """With forms the C gives up on, spans the reference refuses and requests it raises on: the
    same spans, counts and reasons, or the same error."""
    for keep in FILTERS:
        agree(body, keep)


# --- 2. damaged requests ------------------------------------------------------------------------

JSONISH = b'{}[]",:\\ \t\n0123456789-+.eEtrufalsn\x00\x1f\x7f\xc3\xa9\xed\xa0\x80\xff'


def damage(raw: bytes, integer: Callable[[int, int], int]) -> bytes:
    """`raw` with 1 to 3 of: a byte replaced, 1 to 8 bytes deleted, 1 to 3 inserted, the tail cut;
    the new bytes mostly those that matter in JSON."""
    data = bytearray(raw)
    for _ in range(integer(1, 3)):
        how, at = integer(0, 3), integer(0, len(data))

        def byte() -> int:
            return JSONISH[integer(0, len(JSONISH) - 1)] if integer(0, 3) else integer(0, 255)
        if how == 0 and at < len(data):
            data[at] = byte()
        elif how == 1:
            del data[at:at + integer(1, 8)]
        elif how == 2:
            data[at:at] = bytes(byte() for _ in range(integer(1, 3)))
        else:
            del data[at:]
    return bytes(data)


@st.composite
def damaged_requests(draw: st.DrawFn) -> bytes:
    """A generated request (in the common shape or not), damaged."""
    return damage(draw(requests(accepted=draw(st.booleans()))),
                  lambda low, high: draw(st.integers(low, high)))


@UNSHRUNK
@given(damaged_requests())
def test_damaged_requests_decode_or_raise_as_the_reference_does(damaged: bytes) -> None:
    """The same spans and counts, or the same error (orjson's, with its line and column)."""
    for keep in FILTERS:
        agree(damaged, keep)


# --- 3. arbitrary bytes and arbitrary JSON --------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80),
                 st.builds(bytes.__add__, st.sampled_from([b'{"resourceSpans":[', b'{"batches":',
                                                           b'{"resourceSpans":[{"scopeSpans":[']),
                           st.binary(max_size=40))))
def test_any_bytes_at_all(data: bytes) -> None:
    """Bytes, alone or after the opening of a request: no crash, the reference's answer."""
    for keep in FILTERS:
        agree(data, keep)


MEMBERS = ["resourceSpans", "batches", "resource", "attributes", "scopeSpans",
           "instrumentationLibrarySpans", "spans", "traceId", "spanId", "parentSpanId", "name",
           "kind", "startTimeUnixNano", "endTimeUnixNano", "status", "code", "key", "value",
           "stringValue", "intValue", "doubleValue", "boolValue", "arrayValue", "values", "x"]
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                                                                allow_infinity=False),
              TEXT, st.sampled_from(["payment.charge", "5b8efff798038103d269b633813fc60c",
                                     "eee19b7ec3c1b174", "SPAN_KIND_SERVER", "STATUS_CODE_OK",
                                     "NaN", "1700000000000000000", "service.name"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(MEMBERS), inner, max_size=4)),
    max_leaves=16)
SKELETON = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "parentSpanId": "eee19b7ec3c1b173", "name": "payment.charge", "kind": 2,
            "startTimeUnixNano": str(SINCE), "endTimeUnixNano": str(UNTIL),
            "attributes": [{"key": "k", "value": {"stringValue": "v"}}], "status": {"code": 1}}


@BOUNDED
@given(JSON, st.dictionaries(st.sampled_from([*SKELETON, "value", "resource", "scope", "span"]),
                             JSON, max_size=3))
def test_arbitrary_json_decodes_as_the_reference_does(doc: Any, replaced: dict[str, Any]
                                                      ) -> None:
    """A JSON value as the request, and a request whose parts (a span's fields, its attribute's
    value, the span, its resource or scope) are arbitrary JSON values."""
    span = {**SKELETON, **{key: value for key, value in replaced.items() if key in SKELETON}}
    if "value" in replaced:
        span["attributes"] = [{"key": "k", "value": replaced["value"]}]
    request = {"resourceSpans": [{
        "resource": replaced.get("resource", {"attributes": [
            {"key": "service.name", "value": {"stringValue": "orders"}}]}),
        "scopeSpans": [replaced.get("scope", {"spans": [replaced.get("span", span)]})]}]}
    for text in (json.dumps(doc), json.dumps(request, separators=(",", ":"))):
        for keep in FILTERS:
            agree(text.encode(), keep)


# --- 4. what the C gives up on ----------------------------------------------------------------

RESOURCE = '{"attributes":[{"key":"service.name","value":{"stringValue":"o"}}]}'


def line(span: str = '"name":"payment.charge","kind":2', value: str = '{"stringValue":"v"}',
         resource_after: bool = False, resource: str = RESOURCE) -> bytes:
    """A one-span request, with `span`'s members (ids and attributes are added unless they are
    in it): the value of its attribute "k" (which every filter of `GIVE_UP_FILTERS` reads)."""
    if "traceId" not in span:
        span = '"traceId":"5b8efff798038103d269b633813fc60c",' + span
    if "spanId" not in span:
        span = '"spanId":"eee19b7ec3c1b174",' + span
    if '"attributes"' not in span:
        span += f',"attributes":[{{"key":"k","value":{value}}}]'
    spans = f'"scopeSpans":[{{"spans":[{{{span},"startTimeUnixNano":"{SINCE}"}}]}}]'
    members = f'{spans},"resource":{resource}' if resource_after else \
        f'"resource":{resource},{spans}'
    return f'{{"resourceSpans":[{{{members}}}]}}'.encode()


TRACE_B64 = base64.b64encode(bytes.fromhex("5b8efff798038103d269b633813fc60c")).decode()
GIVE_UP_FILTERS = FILTERS[:2]  # exact names, and the glob that reads every attribute
GIVE_UP = {
    "a name twice": line('"name":"payment.charge","kind":2,"name":"payment.charge"'),
    "a trace id twice": line('"name":"payment.charge","traceId":"5b8efff798038103d269b633813fc60c"'
                             ',"traceId":"5b8efff798038103d269b633813fc60c"'),
    "the resource after the spans": line(resource_after=True),
    "a base64 trace id": line(f'"traceId":"{TRACE_B64}","name":"payment.charge"'),
    "an escaped object key": line('"na\\u006de":"payment.charge"'),
    "an escaped span name": line('"name":"payment\\u002echarge"'),
    "a lone surrogate": line(value='{"stringValue":"\\ud800"}'),
    "a lone low surrogate": line(value='{"stringValue":"a\\udc00"}'),
    "a reversed surrogate pair": line(value='{"stringValue":"\\udc00\\ud800"}'),
    "a byte that is no UTF-8": line(value='{"stringValue":"a@"}').replace(b"@", b"\xff"),
    "an overlong UTF-8 sequence": line(value='{"stringValue":"a@"}').replace(b"@", b"\xc0\x80"),
    "a surrogate in UTF-8": line(value='{"stringValue":"a@"}').replace(b"@", b"\xed\xa0\x80"),
    "a span name that is no UTF-8": line('"name":"pay@"').replace(b"@", b"\xff"),
    "a control character in a string": line(value='{"stringValue":"a\x01b"}'),
    "an unknown escape": line(value='{"stringValue":"a\\qb"}'),
    "a double past the largest": line(value='{"doubleValue":1e400}'),
    "an int past 64 bits": line(value='{"intValue":"123456789012345678901234"}'),
    "a JSON int past 64 bits": line(value='{"intValue":123456789012345678901234}'),
    "an array value": line(value='{"arrayValue":{"values":[{"intValue":"1"}]}}'),
    "a kvlist value": line(value='{"kvlistValue":{"values":[]}}'),
    "a bytes value": line(value='{"bytesValue":"AAE="}'),
    "a value of two fields": line(value='{"stringValue":"a","intValue":"1"}'),
    "an unknown value field": line(value='{"bogus":1}'),
    "a stringValue not a string": line(value='{"stringValue":5}'),
    "an intValue not a decimal": line(value='{"intValue":"1x"}'),
    "a boolValue not a bool": line(value='{"boolValue":"true"}'),
    "a value not an object": line(value='"v"'),
    "nesting 1000 deep": line('"name":"payment.charge","events":' + "[" * 1000 + "]" * 1000),
    "nesting 100000 deep": line('"name":"payment.charge","events":' + "[" * 10**5 + "]" * 10**5),
    "garbage after the request": line() + b" x",
    "a second request": line() + b"\n" + line(),
    "a byte order mark": b"\xef\xbb\xbf" + line(),
    "a form feed before the request": b"\x0c" + line(),
    "a zero trace id": line('"traceId":"' + "0" * 32 + '","name":"payment.charge"'),
    "a zero span id": line('"spanId":"' + "0" * 16 + '","name":"payment.charge"'),
    "kind 7": line('"name":"payment.charge","kind":7'),
    "status code 5": line('"name":"payment.charge","status":{"code":5}'),
    "no request": b"",
    "null resourceSpans": b'{"resourceSpans":null}',
    "both resourceSpans and batches": b'{"resourceSpans":[],"batches":[]}',
    "a number with a leading zero": line('"name":"payment.charge","kind":02'),
}


@pytest.mark.parametrize("data", GIVE_UP.values(), ids=GIVE_UP.keys())
def test_the_c_gives_up_and_the_reference_answers(data: bytes) -> None:
    """Outside the common shape, or to be refused or raised on: the C gives up under both
    filters, and `decode_json` answers as the reference does."""
    for keep in GIVE_UP_FILTERS:
        assert not agree(data, keep)


def test_the_line_the_give_up_cases_vary_is_decoded_in_c() -> None:
    """Else the cases above would prove nothing."""
    for keep in GIVE_UP_FILTERS:
        assert agree(line(), keep)
        assert agree(line(value='{"stringValue":"a\\u00e9\\ud83d\\ude00\\"\\\\\\/\\n"}'), keep)
    [[span]] = decode_json(line(), FILTERS[0]).batch.values()
    assert (span.name, span.kind, span.service, span.attributes, span.start_ns) == (
        "payment.charge", "SERVER", "o", {"k": "v"}, SINCE)


BAD_UTF8 = [b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xc2", b"\xe2\x82", b"\xe0\x80\xaf",
            b"\xe0\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf0\x80\x80\xaf",
            b"\xf0\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\xe2\x28\xa1"]
RAW = [bytes([byte]) for byte in range(0x20)] + BAD_UTF8


@pytest.mark.parametrize("raw", RAW, ids=[raw.hex() for raw in RAW])
def test_raw_bytes_json_or_utf_8_refuses_in_every_string(raw: bytes) -> None:
    """A control character or a byte sequence that is no UTF-8 (overlong, a surrogate, past
    U+10FFFF, cut short), in a value, a name, a key and an unknown member's string."""
    for where in (line(value='{"stringValue":"a@b"}'), line('"name":"payment.charge@"'),
                  line('"name":"pay@"'), line(value='{"stringValue":"v"}').replace(
                      b'"key":"k"', b'"key":"k@"'), line(resource=RESOURCE.replace('"o"', '"o@"')),
                  line('"name":"payment.charge","x":"@"')):
        for keep in GIVE_UP_FILTERS:
            agree(where.replace(b"@", raw), keep)


# --- explicit forms: decoded in C, or spelled so the C may decode them or give up ---------------

def span_text(trace: str, span: str, name: str = "payment.charge", more: str = "") -> str:
    return (f'{{"traceId":"{trace}","spanId":"{span}","name":"{name}","startTimeUnixNano":'
            f'"{SINCE}","attributes":[{{"key":"k","value":{{"intValue":"1"}}}}]{more}}}')


def entry(resource: str | None, *spans: str) -> str:
    """A ResourceSpans of one scope, written by hand."""
    scopes = '"scopeSpans":[{"scope":{"name":"s"},"spans":[' + ",".join(spans) + "]}]"
    return "{" + (f'"resource":{resource},' if resource is not None else "") + scopes + "}"


A, B = "5b8efff798038103d269b633813fc60c", "0af7651916cd43dd8448eb211c80319c"
RESOURCE_ALL = ('{"attributes":[{"key":"service.name","value":{"stringValue":"a"}},'
                '{"key":"service.version","value":{"stringValue":"1"}},'
                '{"key":"region","value":{"intValue":"3"}},'
                '{"key":"service.name","value":{"stringValue":"o"}}]}')
TAKEN = {
    "spans of two traces interleaved, ids in either case": (
        '{"resourceSpans":[' + entry(RESOURCE, span_text(A, "eee19b7ec3c1b174"),
                                     span_text(B, "EEE19B7EC3C1B175"),
                                     span_text(A.upper(), "eee19b7ec3c1b176"))
        + "," + entry(RESOURCE_ALL, span_text(B.upper(), "eee19b7ec3c1b177"),
                      span_text(A, "eee19b7ec3c1b178")) + "]}").encode(),
    "a resource, then none": ('{"resourceSpans":[' + entry(RESOURCE_ALL, span_text(A, "e" * 16))
                              + "," + entry(None, span_text(A, "f" * 16)) + "]}").encode(),
    "a resource attribute repeated, last no string or empty": line(resource=(
        '{"attributes":[{"key":"service.name","value":{"stringValue":"a"}},'
        '{"key":"service.version","value":{"stringValue":"1"}},'
        '{"key":"region","value":{"stringValue":"eu"}},'
        '{"key":"service.name","value":{"intValue":"5"}},'
        '{"key":"service.version","value":{"boolValue":true}},{"key":"region","value":{}}]}')),
    "the last of an attribute repeated": line(
        value='{"stringValue":"a"}},{"key":"k","value":{}},{"key":"z","value":{"intValue":"1"}},'
              '{"key":"k","value":{"boolValue":true}},{"key":"k","value":null'),
    "attributes before the name": line('"attributes":[{"key":"k","value":{"intValue":7}}],'
                                       '"name":"payment.charge"'),
    "unknown members everywhere": line(
        f'"traceId":"{A}","spanId":"eee19b7ec3c1b174","traceState":"a=b","flags":257,'
        '"name":"payment.charge","kind":"SPAN_KIND_CONSUMER",'
        '"droppedAttributesCount":2,"events":[{"name":"payment.charge","attributes":[{"key":"k",'
        '"value":{"arrayValue":{"values":[{"bytesValue":"AAE="}]}}}]}],"droppedEventsCount":0,'
        '"links":[{"traceId":"' + "0" * 32 + '","spanId":"x"}],"x":{"y":[1.5e300,null,true]}',
        resource='{"attributes":[],"droppedAttributesCount":0,"x":"\\ud83d\\ude00"}'),
    "a status with its message first": line('"name":"payment.charge","status":{"message":'
                                            '"\\u00e9","code":"STATUS_CODE_ERROR"}'),
    "every kind of escape in a value": line(
        value='{"stringValue":"\\"\\\\\\/\\b\\f\\n\\r\\t\\u0000\\u001f\\u00E9\\uffff\\ud83d\\ude00'
              '\\uDBFF\\uDFFF"}'),
    "raw UTF-8 in a value": line(value='{"stringValue":"é€😀\U0010ffff\x7f"}'),
    "a time at 2^64 - 1": line('"name":"payment.charge","endTimeUnixNano":"18446744073709551615"'),
    "a null time": line('"name":"payment.charge","endTimeUnixNano":null,"kind":0'),
    "a zero parent and an upper-case one": line(
        '"name":"payment.charge","parentSpanId":"0000000000000000"').replace(
            b'"attributes"', b'"x":{"parentSpanId":"EEE19B7EC3C1B173"},"attributes"'),
    "an empty request": b'{"resourceSpans":[]}',
    "Tempo's batches and OTLP before 0.15": (
        '{"batches":[{"resource":' + RESOURCE + ',"instrumentationLibrarySpans":[{'
        '"instrumentationLibrary":{"name":"l"},"spans":[' + span_text(A, "e" * 16) + "]}]}]}"
    ).encode(),
    "whitespace everywhere": b' \r\n\t{ "resourceSpans" :\t[ { "scopeSpans" : [ { "spans" : '
                             b'[ { "traceId" : "5b8efff798038103d269b633813fc60c" , "spanId" '
                             b': "eee19b7ec3c1b174" , "name" : "payment.charge" } ] } ] } ] }\r\n',
}
for number in ("-0", "-0.0", "1E5", "5e-324", "1e-400", "0.30000000000000004", "9007199254740993",
               '"NaN"', '"-Infinity"', "-123456789012345678"):
    TAKEN[f"doubleValue {number}"] = line(value=f'{{"doubleValue":{number}}}')


@pytest.mark.parametrize("data", TAKEN.values(), ids=TAKEN.keys())
def test_forms_the_c_decodes_itself(data: bytes) -> None:
    for keep in FILTERS:
        assert agree(data, keep), keep


def test_spans_go_to_their_trace_with_their_own_resource() -> None:
    keep = SpanFilter.of(FILTERS[1].projection, group_by="region")
    decoded = decode_json(TAKEN["spans of two traces interleaved, ids in either case"], keep)
    assert {trace: [(span.span_id, span.service, span.version, span.group) for span in spans]
            for trace, spans in decoded.batch.items()} == {
        A: [("eee19b7ec3c1b174", "o", None, None), ("eee19b7ec3c1b176", "o", None, None),
            ("eee19b7ec3c1b178", "o", "1", 3)],
        B: [("eee19b7ec3c1b175", "o", None, None), ("eee19b7ec3c1b177", "o", "1", 3)]}
    second = decode_json(TAKEN["a resource, then none"], keep).batch[A][1]
    assert (second.service, second.version, second.group) == (None, None, None)


def escaped(text: str) -> str:
    """`text`'s last character as a \\u escape."""
    return text[:-1] + f"\\u{ord(text[-1]):04X}"


SPELLED = {  # the C may take or leave these; it must not read them otherwise than the reference
    "an escaped attribute key": line().replace(b'"key":"k"', b'"key":"\\u006b"'),
    "an escaped resource key": line(resource=RESOURCE.replace("service.name",
                                                              escaped("service.name"))),
    "an escaped group key": line(resource=RESOURCE_ALL.replace('"region"', '"regio\\u006e"')),
    "an escaped value member": line(value='{"string\\u0056alue":"v"}'),
    "an escaped kind": line('"name":"payment.charge","kind":"' + escaped("SPAN_KIND_SERVER") + '"'),
    "an escaped status code": line('"name":"payment.charge","status":{"code":"'
                                   + escaped("STATUS_CODE_ERROR") + '"}'),
    "an escaped trace id": line(f'"traceId":"{escaped(A)}","name":"payment.charge"'),
    "an escaped parent id": line('"parentSpanId":"' + escaped("eee19b7ec3c1b173")
                                 + '","name":"payment.charge"'),
    "an escaped time": line('"name":"payment.charge","endTimeUnixNano":"1\\u0037"'),
    "an escaped int": line(value='{"intValue":"1\\u0037"}'),
    "an escaped NaN": line(value='{"doubleValue":"Na\\u004e"}'),
    "a mixed-case id": line(f'"traceId":"{A[:16] + A[16:].upper()}","name":"payment.charge"'),
    "a null parent": line('"name":"payment.charge","parentSpanId":null'),
    "an empty parent": line('"name":"payment.charge","parentSpanId":""'),
    "a parent of 0": line('"name":"payment.charge","parentSpanId":0'),
    "no name": line('"kind":1'),
    "null attributes": line('"name":"payment.charge","attributes":null'),
    "attributes an object": line('"name":"payment.charge","attributes":{}'),
    "a value before its key": line().replace(b'{"key":"k","value":{"stringValue":"v"}}',
                                             b'{"value":{"stringValue":"v"},"key":"k"}'),
    "no value": line().replace(b',"value":{"stringValue":"v"}', b""),
    "a key value with more": line(value='{"stringValue":"v"},"x":[]'),
    "a null status": line('"name":"payment.charge","status":null'),
    "a null code": line('"name":"payment.charge","status":{"code":null}'),
    "a null kind": line('"name":"payment.charge","kind":null'),
    "a time of -0": line('"name":"payment.charge","endTimeUnixNano":-0'),
    "a time past 2^64": line('"name":"payment.charge","endTimeUnixNano":18446744073709551616'),
    "a time with leading zeros": line('"name":"payment.charge","endTimeUnixNano":"'
                                      + "0" * 20 + '12"'),
    "a null resource": line(resource="null"),
    "null resource attributes": line(resource='{"attributes":null}'),
    "an empty resource": line(resource="{}"),
    "a resource twice": line(resource=RESOURCE + ',"resource":' + RESOURCE),
    "null scopeSpans": b'{"resourceSpans":[{"scopeSpans":null}]}',
    "null spans": b'{"resourceSpans":[{"scopeSpans":[{"spans":null}]}]}',
    "an empty ResourceSpans": b'{"resourceSpans":[{}]}',
    "a request with more": line()[:-1] + b',"x":{"resourceSpans":1}}',
    "an empty object": b"{}",
    "a span not an object": b'{"resourceSpans":[{"scopeSpans":[{"spans":[5]}]}]}',
}


@pytest.mark.parametrize("data", SPELLED.values(), ids=SPELLED.keys())
def test_spellings_the_c_may_take_or_leave(data: bytes) -> None:
    for keep in FILTERS:
        agree(data, keep)


NUMBERS = ["0", "-0", "0.0", "-0.0", "1", "01", "-01", "1.", ".5", "1.5", "1e5", "1E+5", "1e-5",
           "1e", "1e+", "-", "+1", "0x10", "NaN", "Infinity", "-Infinity", "2", "5", "6",
           "1.7976931348623157e308", "1.7976931348623159e308", "4.9e-324",
           "2.4703282292062328e-324", "2.4703282292062327e-324", "1e-400", "-1e-400",
           "2.2250738585072011e-308", "123456789012345678", "1234567890123456789",
           "9223372036854775807", "9223372036854775808", "-9223372036854775808",
           "18446744073709551615", "18446744073709551616", "9007199254740993",
           "9007199254740993.0", "0.1000000000000000055511151231257827021181583404541015625",
           "1" + "0" * 400, "100e-2", "-0e0", "1" * 30 + "e-30", "true", "null", '"2"', '"-0"',
           '"+1"', '" 1"', '""', '"NaN"', '"nan"', '"Infinity"', '"1e5"', '"007"']
PLACES = {
    "kind": lambda number: line(f'"name":"payment.charge","kind":{number}'),
    "end time": lambda number: line(f'"name":"payment.charge","endTimeUnixNano":{number}'),
    "status code": lambda number: line(f'"name":"payment.charge","status":{{"code":{number}}}'),
    "intValue": lambda number: line(value=f'{{"intValue":{number}}}'),
    "doubleValue": lambda number: line(value=f'{{"doubleValue":{number}}}'),
    "boolValue": lambda number: line(value=f'{{"boolValue":{number}}}'),
    "stringValue": lambda number: line(value=f'{{"stringValue":{number}}}'),
    "an unknown member": lambda number: line(f'"name":"payment.charge","flags":[{number}]'),
    "an unread value": lambda number: line(
        f'"name":"payment.charge","attributes":[{{"key":"u","value":{{"intValue":{number}}}}}]'),
}


@pytest.mark.parametrize("number", NUMBERS)
def test_numbers_in_every_place(number: str) -> None:
    """A number spelled every way, as an id of an enum, a time, a value, an unknown member."""
    for make in PLACES.values():
        for keep in GIVE_UP_FILTERS:
            agree(make(number), keep)


SKIPPED = {  # strings and numbers the C walks past without making them
    "an unknown member of a span": lambda text: line(f'"name":"payment.charge","x":{text}'),
    "the status message": lambda text: line(
        f'"name":"payment.charge","status":{{"code":1,"message":{text}}}'),
    "a span's traceState": lambda text: line(f'"name":"payment.charge","traceState":{text}'),
    "an event": lambda text: line(f'"name":"payment.charge","events":[{{"name":{text}}}]'),
    "an unread attribute": lambda text: line(
        value=f'{{"stringValue":"v"}}}},{{"key":"u","value":{{"stringValue":{text}}}'),
    "a span no rule selects": lambda text: line(f'"name":"noise","x":{text}'),
    "the kind of a span no rule selects": lambda text: line(f'"name":"noise","kind":{text}'),
    "the scope": lambda text: line().replace(b'{"spans"', f'{{"scope":{{"name":{text}}},"spans"'
                                                         .encode()),
    "an unread resource attribute": lambda text: line(resource=(
        '{"attributes":[{"key":"deployment.environment","value":{"stringValue":%s}}]}' % text)),
    "an unknown member of the resource": lambda text: line(resource=f'{{"x":{text}}}'),
    "an unknown member of the request": lambda text: line()[:-1] + f',"x":{text}}}'.encode(),
}
LONE = {"high": '"\\ud800"', "low": '"a\\udc00b"', "low then high": '"\\udc00\\ud800"',
        "high then no low": '"\\ud83d\\u0041"', "high at the end": '"\\uDBFF"'}


@pytest.mark.parametrize("place", SKIPPED)
@pytest.mark.parametrize("lone", LONE.values(), ids=LONE.keys())
def test_a_lone_surrogate_where_the_c_only_walks(place: str, lone: str) -> None:
    """The reference's parsers refuse a lone surrogate anywhere (orjson: "no low surrogate in
    string"), in a string no one reads too."""
    for keep in GIVE_UP_FILTERS:
        agree(SKIPPED[place](lone), keep)


@pytest.mark.parametrize("place", SKIPPED)
@pytest.mark.parametrize("number", ["1e400", "-1E309", "1" + "0" * 400, "1e-400"])
def test_a_number_past_the_largest_double_where_the_c_only_walks(place: str, number: str
                                                                 ) -> None:
    """The reference refuses a number past the largest double in some of those places: a
    resource (msgspec's ValidationError), a span's known member (orjson's error, even in a
    span no rule selects), a status (the span refused); an int of any size it keeps."""
    for keep in GIVE_UP_FILTERS:
        agree(SKIPPED[place](number), keep)


@pytest.mark.parametrize("depth", range(56, 72))
def test_nesting_around_the_limit(depth: int) -> None:
    for nested in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        for where in (line(f'"name":"payment.charge","events":{nested}'),
                      line(value=f'{{"stringValue":"v","x":{nested}}}'),
                      line(resource=f'{{"attributes":[],"x":{nested}}}')):
            for keep in GIVE_UP_FILTERS:
                agree(where, keep)


# --- 5. a line of the collector's file exporter -----------------------------------------------



TRACES = ["01" + "0" * 28 + "01", "01" + "0" * 30, "0" * 30 + "02", "FF" + "0" * 28 + "02",
          "ed042a4151df85c13da0a7a4a162a496", "ED042A4151DF85C13DA0A7A4A162A495"]  # halves shared


def collector_line(more: int = 0) -> bytes:
    """The shape of a line the collector's file exporter writes (a payments service's charges, a
    checkout service's server spans), small, or with `more` charges in 5 more traces."""
    def resource(service: str, version: str) -> dict[str, Any]:
        return {"attributes": [{"key": key, "value": {"stringValue": value}} for key, value in (
            ("service.name", service), ("service.namespace", "omnicart"),
            ("service.version", version), ("deployment.environment", "production"),
            ("telemetry.sdk.name", "opentelemetry"), ("telemetry.sdk.language", "python"),
            ("k8s.cluster.name", "prod-eu-west-1"))]}

    def charge(span_id: str, start: int, attempt: int, intent: str, code: int,
               trace: str = "ed042a4151df85c13da0a7a4a162a495") -> dict[str, Any]:
        strings = {"http.method": "POST", "http.url": "https://api.stripe.com/v1/payment_intents",
                   "net.peer.name": "api.stripe.com"}
        return {
            "traceId": trace, "spanId": span_id,
            "parentSpanId": "db784ea96e00ed3e", "name": "payment.charge", "kind": 3,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 786_861_141),
            "attributes": [
                *({"key": key, "value": {"stringValue": value}} for key, value in strings.items()),
                {"key": "net.peer.port", "value": {"intValue": "443"}},
                {"key": "psp", "value": {"stringValue": "stripe"}},
                {"key": "payment.method", "value": {"stringValue": "card"}},
                {"key": "currency", "value": {"stringValue": "GBP"}},
                {"key": "http.status_code", "value": {"intValue": "502" if code else "200"}},
                {"key": "service.version", "value": {"stringValue": "v2.14.0"}},
                {"key": "amount", "value": {"doubleValue": 2368.23}},
                {"key": "payment_intent_id", "value": {"stringValue": intent}},
                {"key": "attempt", "value": {"intValue": str(attempt)}},
                {"key": "cart.id", "value": {"stringValue": "cart_4a49b37417f4"}},
                {"key": "order_id", "value": {"stringValue": "ord_566e3326c8dd"}},
                {"key": "customer_id", "value": {"stringValue": "cus_98a47968616e"}}],
            "status": {"code": 2, "message": "502 Bad Gateway from psp"} if code else {}}

    checkout = {"traceId": "ed042a4151df85c13da0a7a4a162a495", "spanId": "db784ea96e00ed3e",
                "name": "POST /checkout", "kind": 2, "startTimeUnixNano": "1738368001000000000",
                "endTimeUnixNano": "1738368004000000000",
                "attributes": [{"key": "http.route", "value": {"stringValue": "/checkout"}}],
                "status": {}}
    return json.dumps({"resourceSpans": [
        {"resource": resource("payments", "v2.14.0"), "scopeSpans": [{
            "scope": {"name": "opentelemetry.instrumentation.requests", "version": "0.45b0"},
            "spans": [charge("c9a66c04a8c08947", 1738368001410328926, 1, "pi_a0b5", 2),
                      charge("da4dd96b977ff6a8", 1738368002672189067, 2, "pi_ffff", 0),
                      *(charge(f"{i + 1:016x}", 1738368003000000000 + i, i % 3 + 1, f"pi_{i}",
                               i % 2, TRACES[i % len(TRACES)]) for i in range(more))]}]},
        {"resource": resource("checkout", "v1.2.0"), "scopeSpans": [{
            "scope": {"name": "opentelemetry.instrumentation.flask", "version": "0.45b0"},
            "spans": [checkout]}]}]}, separators=(",", ":")).encode()


def test_a_collector_line_is_decoded_in_c() -> None:
    keep = SpanFilter.of(load_rules_text(RETRY_RULE).projection(), group_by="service.version")
    data = collector_line()
    assert agree(data, keep)
    decoded = decode_json(data, keep)
    assert (decoded.received, decoded.not_selected, decoded.own, decoded.invalid) == (3, 1, 0, [])
    [[first, retry]] = decoded.batch.values()
    assert (retry.span_id, retry.parent_span_id, retry.kind, retry.status, retry.service,
            retry.version, retry.group, retry.start_ns) == (
        "da4dd96b977ff6a8", "db784ea96e00ed3e", "CLIENT", "UNSET", "payments", "v2.14.0",
        "v2.14.0", 1738368002672189067)
    assert retry.attributes == {"service.version": "v2.14.0", "payment_intent_id": "pi_ffff",
                                "attempt": 2, "cart.id": "cart_4a49b37417f4"}
    assert (first.status, type(first.attributes["attempt"])) == ("ERROR", int)


def test_a_large_request_is_decoded_in_c() -> None:
    """3,000 spans of 15 attributes in 6 traces whose ids share halves, each trace's spans
    interleaved with others' (and the first one's id in upper case too)."""
    data = collector_line(more=3000)
    for keep in FILTERS:
        assert agree(data, keep)
    assert len(decode_json(data, FILTERS[1]).batch) == 6


# --- 6. memory safety ---------------------------------------------------------------------------

FUZZ = """
import sys
from pathlib import Path
sys.path[:0] = [*sys.argv[1:3], str(Path(sys.argv[2]).parent)]
import _wire  # the sanitized build
assert Path(_wire.__file__).parent == Path(sys.argv[1]), _wire.__file__
from test_json_wire import (FILTERS, GIVE_UP, SPELLED, TAKEN, Seeded, collector_line, damage,
                            request_bytes)
from sidecar.otlp.json_spans import _c_plan
plans = [_c_plan(keep) for keep in FILTERS]
source = Seeded(7)
rng = source.rng
inputs = [collector_line(more=300), *GIVE_UP.values(), *TAKEN.values(), *SPELLED.values()]
for i in range(2500):
    body = request_bytes(source, accepted=i % 2 == 0)
    inputs += [body, damage(body, rng.randint), body[:rng.randint(0, len(body))],
               rng.randbytes(rng.randint(0, 40))]
taken = 0
for data in inputs:
    for plan in plans:
        taken += _wire.decode_json(data, *plan, {}, {}) is not None
assert taken > 5000, taken  # the decoding was exercised, not only the giving up
print("clean")
"""


def test_no_memory_error_under_address_sanitizer(tmp_path: Path) -> None:
    """The C reads JSON from the network: built with AddressSanitizer and UBSan, it decodes
    10,000 generated, damaged, cut and random requests with each filter without a report (ASan
    aborts on the first). A bytes object ends in a NUL past its size: a read one byte too far
    goes unnoticed, two are reported."""
    fuzz_sanitized(Path(__file__).resolve().parent.parent / "sidecar" / "otlp" / "_wire.c", FUZZ,
                   tmp_path)

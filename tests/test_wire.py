"""The C decoder of a scope's spans (`sidecar.otlp._wire.decode_scope`, behind
`ProtobufDecoder`) against a reference written with upb, the parser it replaced: on generated
requests, well-formed or damaged, both give the same spans, counts and refusals; on any bytes it
never crashes, and under AddressSanitizer it reads nothing it should not. A rule with `under`,
which follows parent links through spans no rule names, never has those skipped."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from processes import fuzz_sanitized

from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import KINDS, STATUSES, Projection, span_of
from sidecar.otlp._wire import decode_scope
from sidecar.otlp.decoded import Decoded, SpanFilter
from sidecar.otlp.protobuf import ProtobufDecoder, any_value
from sidecar.rules.loading import load_rules_text

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["payment.charge", "auth.check", "noise", "", "päyment", "payment.charg", VIOLATION_SPAN]


def value() -> st.SearchStrategy[AnyValue]:
    return st.one_of(st.builds(AnyValue, string_value=st.text(max_size=12)),
                     st.builds(AnyValue, int_value=st.integers(-2**63, 2**63 - 1)),
                     st.builds(AnyValue, bool_value=st.booleans()),
                     st.builds(AnyValue, double_value=st.floats(allow_nan=False)),
                     st.builds(AnyValue, array_value=st.builds(ArrayValue, values=st.lists(
                         st.builds(AnyValue, int_value=st.integers(0, 9)), max_size=2))),
                     st.builds(AnyValue, bytes_value=st.binary(max_size=3)),
                     st.just(AnyValue()))


SPAN = st.builds(
    Span, trace_id=st.one_of(st.binary(min_size=16, max_size=16), st.sampled_from([b"", bytes(16)])),
    span_id=st.one_of(st.binary(min_size=8, max_size=8), st.sampled_from([b"", bytes(8)])),
    parent_span_id=st.sampled_from([b"", bytes(8), bytes(range(1, 9))]), name=st.sampled_from(NAMES),
    trace_state=st.sampled_from(["", "k=v"]), kind=st.integers(0, 7),
    start_time_unix_nano=st.integers(0, 2**64 - 1), end_time_unix_nano=st.integers(0, 2**64 - 1),
    attributes=st.lists(st.builds(KeyValue, key=st.sampled_from(["a", "amount", "k", "ü"]),
                                  value=value()), max_size=4),
    events=st.lists(st.builds(Span.Event, name=st.sampled_from(["payment.charge", "e"])),
                    max_size=2),
    status=st.builds(Status, code=st.integers(0, 3), message=st.sampled_from(["", "x"])),
    flags=st.integers(0, 2**32 - 1))
SCOPE = st.builds(ScopeSpans, scope=st.builds(InstrumentationScope,
                                              name=st.sampled_from(["", "payment.charge"])),
                  spans=st.lists(SPAN, max_size=8), schema_url=st.sampled_from(["", "s"]))

# --- the reference: what upb reads, span by span --------------------------------------------------


def _classes() -> dict[str, Any]:
    """The span as upb reads it in two depths: the top-level fields with the name and the
    attributes left as bytes (all a span no rule selects is walked for), and a selected span,
    whose name and attribute keys upb checks are UTF-8."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="wire_test.proto", package="wire_test",
                                              syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, str]) -> None:
        added = file.message_type.add(name=name)
        for field, number, kind, type_name in fields:
            added.field.add(name=field, number=number, type=kind,  # type: ignore[arg-type]
                            label=F.LABEL_REPEATED if field == "attributes" else
                            F.LABEL_OPTIONAL,
                            **({"type_name": ".wire_test." + type_name} if type_name else {}))

    top = (("trace_id", 1, F.TYPE_BYTES, ""), ("span_id", 2, F.TYPE_BYTES, ""),
           ("parent_span_id", 4, F.TYPE_BYTES, ""), ("kind", 6, F.TYPE_INT32, ""),
           ("start", 7, F.TYPE_FIXED64, ""), ("end", 8, F.TYPE_FIXED64, ""),
           ("status", 15, F.TYPE_BYTES, ""))
    message("RawScope", ("spans", 2, F.TYPE_BYTES, ""))
    file.message_type[-1].field[0].label = F.LABEL_REPEATED
    message("TopSpan", *top, ("name", 5, F.TYPE_BYTES, ""), ("attributes", 9, F.TYPE_BYTES, ""))
    message("KeyValue", ("key", 1, F.TYPE_STRING, ""), ("value", 2, F.TYPE_BYTES, ""))
    message("SelectedSpan", *top, ("name", 5, F.TYPE_STRING, ""),
            ("attributes", 9, F.TYPE_MESSAGE, "KeyValue"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"wire_test.{name}"))
            for name in ("RawScope", "TopSpan", "SelectedSpan")}


UPB = _classes()


def reference(scopes: list[tuple[bytes, str | None]], keep: SpanFilter) -> Decoded:
    """Scopes (each with its resource's service.name) as the C decoder must read them, written
    with upb and plain Python."""
    out, bare = Decoded(), set[str]()
    for scope, service in scopes:
        _reference_scope(scope, service, keep, out, bare)
    out.not_selected = out.received - out.own - len(out.invalid) - sum(map(len, out.batch.values()))
    out.bare_trace_ids = bare - out.batch.keys()
    return out


def _reference_scope(scope: bytes, service: str | None, keep: SpanFilter, out: Decoded,
                     bare: set[str]) -> None:
    projection, names = keep.projection, keep.projection.names
    try:
        bodies = UPB["RawScope"].FromString(scope).spans
    except DecodeError:
        out.received += 1
        out.invalid.append("invalid ScopeSpans")
        return
    out.received += len(bodies)
    for body in bodies:
        try:
            top = UPB["TopSpan"].FromString(body)
        except DecodeError:
            out.invalid.append("invalid span")
            continue
        if names is not None and top.name.decode("utf-8", "replace") not in names | {
                VIOLATION_SPAN}:
            name = None
        else:
            try:
                name = top.name.decode()
            except UnicodeDecodeError:
                out.invalid.append("invalid span")
                continue
        in_window = keep.since_ns <= top.start < keep.until_ns
        if name is None or (name != VIOLATION_SPAN and not projection.wants_name(name)):
            if projection.trace_ids and len(top.trace_id) == 16 and any(top.trace_id) \
                    and in_window:
                bare.add(top.trace_id.hex())
            continue
        if name == VIOLATION_SPAN:
            out.own += 1
            continue
        if not in_window:
            continue
        if len(top.trace_id) != 16 or not any(top.trace_id):
            out.invalid.append(f"span {name!r}: invalid trace_id {top.trace_id.hex()!r}")
            continue
        if len(top.span_id) != 8 or not any(top.span_id):
            out.invalid.append(f"span {name!r}: invalid span_id {top.span_id.hex()!r}")
            continue
        try:
            span = UPB["SelectedSpan"].FromString(body)
        except DecodeError:
            out.invalid.append("invalid span")
            continue
        keys = projection.attributes_for(name)
        try:
            attributes = {kv.key: any_value(AnyValue.FromString(kv.value))
                          for kv in span.attributes if keys is None or kv.key in keys}
            code = Status.FromString(span.status).code
        except (DecodeError, UnicodeDecodeError) as exc:
            out.invalid.append(f"span {name!r}: invalid attribute or status: {exc}")
            continue
        out.batch.setdefault(span.trace_id.hex(), []).append(span_of(
            span.trace_id.hex(), span.span_id.hex(), name,
            "" if span.parent_span_id == bytes(8) else span.parent_span_id.hex(), span.start,
            span.end, STATUSES[code] if 0 <= code < 3 else "UNSET",
            KINDS[span.kind] if 0 <= span.kind < 6 else "UNSPECIFIED", service, None,
            attributes, None))


def decode(scope: bytes, keep: SpanFilter) -> Decoded:
    """`scope` decoded by the protobuf decoder, as the one scope of a request."""
    return ProtobufDecoder(keep).decode(field(1, field(2, scope)))


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    size, length = bytearray(), len(payload)
    while length > 0x7F:
        size.append(length & 0x7F | 0x80)
        length >>= 7
    size.append(length)
    return bytes([number << 3 | 2]) + bytes(size) + payload


def request(scopes: list[ScopeSpans]) -> tuple[bytes, list[tuple[bytes, str | None]]]:
    """A request holding `scopes` under resources of two services (and one without), and what
    the reference reads it as."""
    services = [None if i % 3 == 2 else f"svc{i % 3}" for i in range(len(scopes))]
    body = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[KeyValue(key="service.name",
                                               value=AnyValue(string_value=service))])
        if service else None, scope_spans=[scope])
        for scope, service in zip(scopes, services)]).SerializeToString()
    return body, [(scope.SerializeToString(), service)
                  for scope, service in zip(scopes, services)]


def same(got: Decoded, expected: Decoded, reasons: bool = True) -> None:
    assert got.batch == expected.batch
    assert (got.received, got.not_selected, got.own, got.bare_trace_ids) == \
        (expected.received, expected.not_selected, expected.own, expected.bare_trace_ids)
    if reasons:  # the reasons of the refusals upb words as the C does, and the C's own
        assert [r.split(" (")[0] if r.startswith("invalid ") else r for r in got.invalid] == \
            [r.split(":")[0] if r.startswith("invalid span:") else r for r in expected.invalid]
    else:
        assert len(got.invalid) == len(expected.invalid)


RULES = """rules:
  - id: retried
    severity: high
    condition: trace.count(payment.charge) > 1 and not auth.check.where(amount > 0)
    signal:
      context: [k]
"""


def filters() -> list[SpanFilter]:
    """Exact names (unselected spans walked, not parsed); a glob with every attribute (each name
    classified once); a rule that fires without its spans (trace ids kept) in a time window."""
    exact = load_rules_text(RULES).projection()
    assert exact.names == {"payment.charge", "auth.check"}
    glob = Projection(lambda name: name.startswith("pay"), None, names=None)
    absent = load_rules_text(RULES.replace("trace.count(payment.charge) > 1 and ", "")
                             ).projection()
    assert absent.trace_ids and absent.names is None
    return [SpanFilter(exact), SpanFilter(glob),
            SpanFilter(absent, since_ns=2**40, until_ns=2**63)]


@BOUNDED
@given(st.lists(SCOPE, max_size=4))
def test_well_formed_requests_decode_as_upb_reads_them(scopes: list[ScopeSpans]) -> None:
    body, expected = request(scopes)
    for keep in filters():
        same(ProtobufDecoder(keep).decode(body), reference(expected, keep))


@BOUNDED
@given(SCOPE, st.data())
def test_damaged_scopes_decode_as_upb_reads_them(scope: ScopeSpans, data: st.DataObject) -> None:
    """Truncated, flipped or spliced bytes: the same spans kept, and the same ones refused."""
    damaged = damage(scope.SerializeToString(),
                     lambda low, high: data.draw(st.integers(low, high)))
    for keep in filters():
        same(decode(damaged, keep), reference([(damaged, None)], keep), reasons=False)


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_any_bytes_at_all(data: bytes) -> None:
    for keep in filters():
        same(decode(data, keep), reference([(data, None)], keep), reasons=False)


def test_the_last_field_wins_and_odd_wire_types_are_skipped_as_in_upb() -> None:
    """Protobuf merges a repeated singular field: the last Span.name on the wire is the name. A
    known field in an unexpected wire type, or a group, is an unknown field to upb: skipped."""
    keep = filters()[0]
    span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="payment.charge",
                start_time_unix_nano=5).SerializeToString()
    renamed = span + Span(name="noise").SerializeToString()
    odd = (span + b"\x38\x07"  # start (fixed64) as a varint
           + b"\x2b\x2a\x01x\x2c"  # name as a group holding a name
           + b"\x4a\x04\x0a\x02\xff\xfe")  # an attribute key that is not UTF-8 (refused)
    for body, kept in ((span, 1), (renamed, 0), (Span(name="noise").SerializeToString() + span, 1),
                       (odd[:-6], 1), (odd, 0)):
        out = decode(field(2, body), keep)
        assert sum(map(len, out.batch.values())) == kept
        same(out, reference([(field(2, body), None)], keep))
    [[only]] = decode(field(2, odd[:-6]), keep).batch.values()
    assert (only.name, only.start_ns) == ("payment.charge", 5)
    assert decode(field(2, odd), keep).invalid == [
        f"invalid span ({len(odd)} bytes): String field had bad UTF-8"]


@pytest.mark.parametrize("status, read", [
    (b"", "UNSET"), (b"\x18\x02", "ERROR"), (b"\x12\x03bad\x18\x01", "OK"),
    (b"\x18\x02\x12\x00\x18\x01", "OK"),  # the last code wins
    (b"\x18\x82\x80\x80\x80\x10", "ERROR"),  # 2^32 + 2: an enum is an int32
    (b"\x18" + b"\xff" * 9 + b"\x01", "UNSET"),  # -1
    (b"\x18\x07", "UNSET"), (b"\x22\x01x\x18\x02", "ERROR"),  # an unknown field skipped
    (b"\x12\x02\xff\xfe\x18\x02", None), (b"\x18", None)])  # not UTF-8; cut short
def test_a_status_reads_as_upb_reads_it(status: bytes, read: str | None) -> None:
    body = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                name="payment.charge").SerializeToString() + field(15, status)
    keep = filters()[0]
    decoder, fallbacks = ProtobufDecoder(keep), []
    status_of = decoder.plan[8]
    decoder.plan = (*decoder.plan[:8], lambda raw: fallbacks.append(raw) or status_of(raw),
                    *decoder.plan[9:])  # what the C leaves to Python: only what is malformed
    out = decoder.decode(field(1, field(2, field(2, body))))
    same(out, reference([(field(2, body), None)], keep), reasons=False)
    assert fallbacks == ([] if read else [status])
    if read is None:
        assert out.invalid[0].startswith("span 'payment.charge': invalid attribute or status: ")
    else:
        [[span]] = out.batch.values()
        assert span.status == read


def test_a_key_upb_refuses_is_refused() -> None:
    """A field number of 0, or a key past 32 bits (a number over 2^29 - 1): upb calls the wire
    format corrupt, and so does the C. (The damaged-bytes test found the second: a flipped first
    byte made the walk skip along until a key of field 1409286147.)"""
    keep = filters()[0]
    span = b"\x12\x02\x2a\x00"  # one span, with an empty name
    for bad_key in (b"\x00", b"\x80\x80\x80\x80\x10", b"\x9d\x80\x80\x80\x50"):
        data = span + bad_key + b"\x00"
        with pytest.raises(DecodeError):
            UPB["RawScope"].FromString(data)
        assert decode(data, keep).invalid == [f"invalid ScopeSpans ({len(data)} bytes): Wire "
                                              "format was corrupt"]
    padded = b"\x12\x07\xaa\x80\x80\x80\x80\x00\x00"  # a name's key in 6 bytes: upb takes 5
    with pytest.raises(DecodeError):
        UPB["TopSpan"].FromString(padded[2:])
    assert decode(padded, keep).invalid == ["invalid span (7 bytes): Wire format was corrupt"]
    largest = b"\xf8\xff\xff\xff\x0f\x00"  # field 2^29 - 1, a varint: upb skips it
    assert len(UPB["RawScope"].FromString(span + largest).spans) == 1
    assert decode(span + largest, keep).not_selected == 1


def test_a_bad_resource_attribute_is_no_refused_span() -> None:
    """Its reason is reported with the refused spans', but its spans still count as they are."""
    unselected = field(2, Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                               name="noise").SerializeToString())
    resource = field(1, field(1, field(1, b"service.name") + field(2, b"\xff\xff")))
    decoder = ProtobufDecoder(filters()[0])
    for _ in range(2):  # reported every time (a well-formed resource is remembered)
        out = decoder.decode(field(1, resource + field(2, unselected)))
        assert out.invalid == ["invalid resource attribute: Wire format was corrupt"]
        assert (out.received, out.not_selected, out.batch) == (1, 1, {})


def test_resources_are_read_alike_the_first_time_and_after() -> None:
    """A resource's service, version and group come out the same from a decoder that has seen
    it before, and a resource failing part-way keeps what it read before the failure."""
    keep = filters()[0]
    good = field(1, field(1, b"service.name") + field(2, field(1, b"payments")))
    version = field(1, field(1, b"service.version") + field(2, field(3, b"\x07")))  # an int
    bad = field(1, field(1, b"service.version") + field(2, b"\xff\xff"))
    selected = field(2, Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                             name="payment.charge").SerializeToString())
    shared = ProtobufDecoder(keep)
    for resource in (good + version, good + bad, good, b"", good + version):
        request = field(1, field(1, resource) + field(2, selected))
        fresh, again = ProtobufDecoder(keep).decode(request), shared.decode(request)
        assert fresh.invalid == again.invalid
        [[first]], [[second]] = fresh.batch.values(), again.batch.values()
        assert (first.service, first.version) == (second.service, second.version)
        assert first.service == ("payments" if resource else None)
        assert first.version is None  # an int, or unreadable: not a version


def test_arguments_are_checked() -> None:
    plan = ProtobufDecoder(filters()[0]).plan
    good = (b"", plan, (None, None, None), {}, {}, [], None)
    assert decode_scope(*good) == (0, 0, 0)
    for at, bad in ((0, "text"), (1, plan[:-1]), (2, (None, None)), (3, []), (5, ()), (6, [])):
        with pytest.raises((TypeError, ValueError)):
            decode_scope(*good[:at], bad, *good[at + 1:])
    with pytest.raises(TypeError):
        decode_scope(*good[:-1])
    with pytest.raises(TypeError, match="descriptors"):
        decode_scope(b"", plan[:4] + (("x",) * 12,) + plan[5:], *good[2:])


def damage(raw: bytes, integer: Callable[[int, int], int]) -> bytes:
    """`raw` with 1 to 3 bytes flipped, cuts or 1 to 3 bytes inserted, where and what drawn by
    `integer(low, high)` (Hypothesis here, a seeded random in the sanitizer's run)."""
    data = bytearray(raw)
    for _ in range(integer(1, 3)):
        how, at = integer(0, 2), integer(0, len(data))
        if how == 0 and at < len(data):
            data[at] = integer(0, 255)
        elif how == 1:
            del data[at:]
        else:
            data[at:at] = bytes(integer(0, 255) for _ in range(integer(1, 3)))
    return bytes(data)


# --- which projections skip unnamed spans, and why it matters ---------------------------------

def test_names_are_none_where_spans_no_rule_names_matter() -> None:
    """The selector runs only when the selected names are exactly a set."""
    def names(condition: str) -> Any:
        return load_rules_text(f"rules:\n  - id: r\n    severity: low\n    condition: "
                               f"{condition}\n").projection().names
    assert names("trace.has(a) and trace.has(b)") == {"a", "b"}
    assert names('trace.has("db.*")') is None  # a glob
    assert names("not trace.has(a)") is None  # fires without its spans: every trace id matters
    under = load_rules_text("rules:\n  - id: r\n    severity: low\n    for_each: agent.refund\n"
                            "    always: human.approval under this\n").projection()
    assert under.names is None


def test_replay_follows_under_through_a_scope_no_rule_names(tmp_path: Path) -> None:
    """`under this` walks parent links through spans no rule names. Protobuf replay skipped whole
    scopes without a named span, so a refund approved through a step in another service's scope
    was signalled as unapproved (JSON found no violation). Both formats agree now."""
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - id: refund-approved\n    severity: high\n    for_each: agent.refund\n"
        "    always: human.approval under this\n")
    trace_id = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")

    def scope(name: str, span_id: int, parent: int | None) -> ScopeSpans:
        return ScopeSpans(spans=[Span(
            trace_id=trace_id, span_id=span_id.to_bytes(8, "big"), name=name,
            parent_span_id=b"" if parent is None else parent.to_bytes(8, "big"),
            start_time_unix_nano=1_700_000_000_000_000_000 + span_id,
            end_time_unix_nano=1_700_000_000_000_001_000)])
    body, _ = request([scope("agent.refund", 1, None), scope("workflow.step", 2, 1),
                       scope("human.approval", 3, 2)])
    (tmp_path / "traces.binpb").write_bytes(struct.pack(">I", len(body)) + body)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "replay", "--rules", str(tmp_path / "rules.yaml"),
         "--format", "jsonl", str(tmp_path / "traces.binpb")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "refund-approved: 0 violation(s) in 1 applicable trace(s)" in result.stderr


# --- memory safety --------------------------------------------------------------------------------

FUZZ = """
import os, random, sys
sys.path[:0] = sys.argv[1:3]
import _wire  # the sanitized build
from test_wire import damage, filters
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, Status
from sidecar.otlp.protobuf import ProtobufDecoder
rng = random.Random(7)
plans = [ProtobufDecoder(keep).plan for keep in filters()]
base = ScopeSpans(spans=[Span(
    trace_id=os.urandom(16), span_id=os.urandom(8), parent_span_id=os.urandom(8),
    name=rng.choice(["payment.charge", "x", "auth.check"]), start_time_unix_nano=2**50,
    status=Status(code=2), attributes=[KeyValue(key=k, value=AnyValue(string_value="v"))
                                       for k in ("amount", "k", "z")])
    for _ in range(40)]).SerializeToString()
for _ in range(10000):
    for plan in plans:
        for data in (damage(base, rng.randint), os.urandom(rng.randint(0, 40))):
            _wire.decode_scope(data, plan, ("s", "v", None), {}, {}, [], set())
print("clean")
"""


def test_no_memory_error_under_address_sanitizer(tmp_path: Path) -> None:
    """The C walk reads bytes from the network: built with AddressSanitizer and UBSan, it runs
    over 60,000 damaged and random inputs without a report (ASan aborts on the first one).
    With Python's own allocator a read past a bytes object's end went unnoticed: a bounds check
    removed from `fixed64`, then from `delimited`, fails this test only without it."""
    fuzz_sanitized(Path(__file__).resolve().parent.parent / "sidecar" / "otlp" / "_wire.c", FUZZ,
                   tmp_path)

"""The compiled span selector (`sidecar.otlp._wire.select_spans`) against upb, the parser it
stands in front of: on well-formed ScopeSpans it keeps exactly the spans whose name is selected,
byte for byte; on any bytes it never crashes, and whatever it accepts upb frames the same way.
Then the protobuf decoder with and without it gives the same spans and counts, and a rule with
`under`, which follows parent links through spans no rule names, never has those skipped."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from processes import missing

from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import Projection
from sidecar.otlp._wire import select_spans
from sidecar.otlp.decoded import Decoded, SpanFilter
from sidecar.otlp.protobuf import ProtobufDecoder, _lean_classes
from sidecar.rules.loading import load_rules_text

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["payment.charge", "auth.check", "noise", "", "päyment", "payment.charg", VIOLATION_SPAN]
SELECTED = (b"auth.check", b"payment.charge", VIOLATION_SPAN.encode())
RawScopeSpans = _lean_classes()[3]  # the spans of a scope as bytes, framed by upb


def value() -> st.SearchStrategy[AnyValue]:
    return st.one_of(st.builds(AnyValue, string_value=st.text(max_size=12)),
                     st.builds(AnyValue, int_value=st.integers(-2**63, 2**63 - 1)),
                     st.builds(AnyValue, bool_value=st.booleans()),
                     st.builds(AnyValue, double_value=st.floats(allow_nan=False)))


SPAN = st.builds(
    Span, trace_id=st.binary(min_size=16, max_size=16), span_id=st.binary(min_size=8, max_size=8),
    parent_span_id=st.sampled_from([b"", bytes(range(1, 9))]), name=st.sampled_from(NAMES),
    trace_state=st.sampled_from(["", "k=v"]), kind=st.integers(0, 5),
    start_time_unix_nano=st.integers(0, 2**64 - 1), end_time_unix_nano=st.integers(0, 2**64 - 1),
    attributes=st.lists(st.builds(KeyValue, key=st.sampled_from(["a", "amount", "k"]),
                                  value=value()), max_size=4),
    events=st.lists(st.builds(Span.Event, name=st.sampled_from(["payment.charge", "e"])),
                    max_size=2),
    status=st.builds(Status, code=st.integers(0, 2), message=st.sampled_from(["", "x"])),
    flags=st.integers(0, 2**32 - 1))
SCOPE = st.builds(ScopeSpans, scope=st.builds(InstrumentationScope,
                                              name=st.sampled_from(["", "payment.charge"])),
                  spans=st.lists(SPAN, max_size=8), schema_url=st.sampled_from(["", "s"]))


@BOUNDED
@given(SCOPE)
def test_keeps_exactly_the_selected_spans(scope: ScopeSpans) -> None:
    data = scope.SerializeToString()
    count, kept = select_spans(data, SELECTED)
    wanted = [span for span in scope.spans if span.name.encode() in SELECTED]
    assert count == len(scope.spans)
    if not wanted:
        assert kept is None
    elif len(wanted) == len(scope.spans):
        assert kept is data
    else:
        assert ScopeSpans.FromString(kept).spans == wanted
        assert kept == ScopeSpans(spans=wanted).SerializeToString()


def test_the_last_name_wins_as_in_upb() -> None:
    """Protobuf merges a repeated singular field: the last Span.name on the wire is the name."""
    span = Span(trace_id=bytes(16), span_id=bytes(8), name="payment.charge").SerializeToString()
    renamed = span + Span(name="noise").SerializeToString()
    for body, selected in ((span, True), (renamed, False),
                           (Span(name="noise").SerializeToString() + span, True)):
        data = b"\x12" + bytes([len(body)]) + body
        assert Span.FromString(body).name == ("payment.charge" if selected else "noise")
        assert select_spans(data, SELECTED) == (1, data if selected else None)


@BOUNDED
@given(SCOPE, st.data())
def test_damaged_bytes_are_never_misframed(scope: ScopeSpans, data: st.DataObject) -> None:
    """Truncated, flipped or spliced bytes: None (upb then says why), or the same framing upb
    reads: as many spans, and only whole spans kept."""
    damaged = damage(scope.SerializeToString(),
                     lambda low, high: data.draw(st.integers(low, high)))
    walked = select_spans(damaged, SELECTED)
    if walked is None:
        return
    count, kept = walked
    framed = RawScopeSpans.FromString(damaged).spans  # what select_spans accepts, upb frames
    assert count == len(framed)
    if kept is not None and kept is not damaged:
        # whole spans of the scope, in order: every one upb names as selected, and besides them
        # only spans upb refuses (a name it cannot read), which the decoder then refuses alone
        spans = RawScopeSpans.FromString(kept).spans
        remaining = iter(framed)
        assert all(body in remaining for body in spans)
        assert [body for body in spans if _name(body) is not None] == [
            body for body in framed if _name(body) in SELECTED]


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


def _name(body: bytes) -> bytes | None:
    """Span.name as upb reads it with every other field left unparsed (a span whose events are
    damaged is still kept: the decoder's upb parse then refuses it alone)."""
    try:
        return NamedSpan.FromString(body).name.encode()
    except DecodeError:
        return None


def _named_span() -> Any:
    file = descriptor_pb2.FileDescriptorProto(name="wire_test.proto", package="wire_test",
                                              syntax="proto3")
    file.message_type.add(name="NamedSpan").field.add(
        name="name", number=5, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("wire_test.NamedSpan"))


NamedSpan = _named_span()


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_any_bytes_at_all(data: bytes) -> None:
    walked = select_spans(data, SELECTED)
    if walked is not None:
        try:
            framed = RawScopeSpans.FromString(data).spans
        except DecodeError:
            return  # upb checks more than the framing (e.g. a group's end): it refuses it then
        assert walked[0] == len(framed)


def test_a_key_upb_refuses_is_refused() -> None:
    """A field number of 0, or a key past 32 bits (a number over 2^29 - 1): upb calls the wire
    format corrupt, so the walk gives None. (Found by the damaged-bytes test: a flipped first
    byte made the walk skip along until a key of field 1409286147.)"""
    span = b"\x12\x02\x2a\x00"  # one span, with an empty name
    for bad_key in (b"\x00", b"\x80\x80\x80\x80\x10", b"\x9d\x80\x80\x80\x50"):
        data = span + bad_key + b"\x00"
        with pytest.raises(DecodeError):
            RawScopeSpans.FromString(data)
        assert select_spans(data, SELECTED) is None
    largest = b"\xf8\xff\xff\xff\x0f\x00"  # field 2^29 - 1, a varint: upb skips it
    assert len(RawScopeSpans.FromString(span + largest).spans) == 1
    assert select_spans(span + largest, SELECTED) == (1, None)


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError):
        select_spans("text", SELECTED)
    with pytest.raises(TypeError):
        select_spans(b"", ["auth.check"])
    with pytest.raises(TypeError):
        select_spans(b"", ("auth.check",))
    assert select_spans(b"", SELECTED) == (0, None)


# --- the decoder, with and without the selector ------------------------------------------------

def request(scopes: list[ScopeSpans]) -> bytes:
    return ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(resource=Resource(attributes=[KeyValue(
            key="service.name", value=AnyValue(string_value=f"svc{i % 2}"))]), scope_spans=[scope])
        for i, scope in enumerate(scopes)]).SerializeToString()


def decoded(out: Decoded) -> tuple[Any, ...]:
    return (out.batch, out.received, out.not_selected, out.own, out.invalid, out.bare_trace_ids)


RULES = """rules:
  - id: retried
    severity: high
    condition: trace.count(payment.charge) > 1 and not auth.check.where(amount > 0)
    signal:
      context: [k]
"""


@BOUNDED
@given(st.lists(SCOPE, max_size=4))
def test_the_decoder_keeps_what_it_kept_without_the_selector(scopes: list[ScopeSpans]) -> None:
    """Valid requests: the same spans, attributes and counts as parsing every span and testing
    its name in Python (a projection without `names`)."""
    projection = load_rules_text(RULES).projection()
    assert projection.names == {"payment.charge", "auth.check"}
    parsing_all = Projection(projection.wants_name, projection.attributes,
                             projection.attributes_for, False, projection.most_attributes)
    body = request(scopes)
    skipping = ProtobufDecoder(SpanFilter(projection))
    assert skipping.selected_names is not None
    assert decoded(skipping.decode(body)) == \
        decoded(ProtobufDecoder(SpanFilter(parsing_all)).decode(body))


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
    body = request([scope("agent.refund", 1, None), scope("workflow.step", 2, 1),
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
from test_wire import SELECTED, damage
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span
rng = random.Random(7)
base = ScopeSpans(spans=[Span(trace_id=os.urandom(16), span_id=os.urandom(8),
                              name=rng.choice(["payment.charge", "x", "auth.check"]))
                         for _ in range(80)]).SerializeToString()  # past the 64 kept inline
for _ in range(30000):
    _wire.select_spans(damage(base, rng.randint), SELECTED)
    _wire.select_spans(os.urandom(rng.randint(0, 40)), SELECTED)
print("clean")
"""


def test_no_memory_error_under_address_sanitizer(tmp_path: Path) -> None:
    """The C walk reads bytes from the network: built with AddressSanitizer and UBSan, it runs
    over 60,000 damaged and random inputs without a report (ASan aborts on the first one)."""
    library = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, timeout=30)
    if library.returncode != 0 or not Path(library.stdout.strip()).is_absolute():
        missing("gcc's AddressSanitizer runtime", "gcc")
    source = Path(__file__).resolve().parent.parent / "sidecar" / "otlp" / "_wire.c"
    built = tmp_path / ("_wire" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(built)],
                   check=True, timeout=120)
    fuzz = tmp_path / "fuzz.py"
    fuzz.write_text(FUZZ)
    env = {**os.environ, "LD_PRELOAD": library.stdout.strip(),
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0"}
    result = subprocess.run([sys.executable, str(fuzz), str(tmp_path),
                             str(Path(__file__).resolve().parent)], capture_output=True,
                            text=True, timeout=110, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "clean"

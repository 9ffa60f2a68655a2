"""Reading OTLP JSON trace files (Collector file exporter, Tempo, pretty-printed) into Spans: the
decoder, and the files as replay reads them."""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.model.spans import Projection, Span
from sidecar.otlp.decoded import SpanFilter
from sidecar.otlp.json_spans import InputError, decode_json_request
from sidecar.replay.sources import read_source


def read_spans(source: str, errors: list[InputError] | None = None) -> list[Span]:
    """Every span of a source as replay reads it (no rules: nothing pruned); without an error
    list, the first problem raises ValueError."""
    found: list[InputError] = [] if errors is None else errors
    spans = [span for batch in read_source(source, SpanFilter(Projection.everything()), found)
             for trace in batch.values() for span in trace]
    if errors is None and found:
        raise ValueError(str(found[0]))
    return spans


TRACE = "5b8efff798038103d269b633813fc60c"
SPAN = "eee19b7ec3c1b174"
PARENT = "eee19b7ec3c1b173"


def b64(hex_id: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_id)).decode()


def otlp_span(name: str = "GET /orders", **fields: Any) -> dict[str, Any]:
    span: dict[str, Any] = {
        "traceId": TRACE, "spanId": SPAN, "parentSpanId": PARENT, "name": name,
        "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000250000000",
        "kind": 2, "status": {"code": 2},
        "attributes": [{"key": "http.method", "value": {"stringValue": "GET"}}],
    }
    span.update(fields)
    return {key: value for key, value in span.items() if value is not None}


def request(*spans: dict[str, Any], service: str | None = "orders", key: str = "resourceSpans",
            scope_key: str = "scopeSpans") -> dict[str, Any]:
    attributes = [{"key": "host.name", "value": {"stringValue": "h1"}}]
    if service is not None:
        attributes.append({"key": "service.name", "value": {"stringValue": service}})
    scope = {"scope": {"name": "lib"}, "spans": list(spans)}
    return {key: [{"resource": {"attributes": attributes}, scope_key: [scope]}]}


def expected(name: str = "GET /orders", **fields: Any) -> Span:
    values: dict[str, Any] = dict(
        parent_span_id=PARENT, start_ns=1700000000000000000, end_ns=1700000000250000000,
        status="ERROR", kind="SERVER", service="orders", attributes={"http.method": "GET"},
    )
    values.update(fields)
    return Span(TRACE, SPAN, name, **values)


def decoded(doc: Any, projection: Projection | None = None) -> tuple[list[Span], list[str]]:
    """The spans kept of a request parsed from JSON (the entry the Tempo and Jaeger backends
    use), and the reasons of those refused."""
    out = decode_json_request(doc, SpanFilter(projection or Projection.everything()))
    return [span for spans in out.batch.values() for span in spans], out.invalid


def one(doc: dict[str, Any], projection: Projection | None = None) -> Span:
    spans, rejected = decoded(doc, projection)
    assert rejected == []
    assert len(spans) == 1
    return spans[0]


def write_lines(path: Path, *docs: dict[str, Any] | str) -> Path:
    path.write_text("".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in docs))
    return path


# --- ids ----------------------------------------------------------------------------------------


def test_hex_uppercase_hex_and_base64_ids_give_the_same_span() -> None:
    plain = one(request(otlp_span()))
    upper = one(request(otlp_span(traceId=TRACE.upper(), spanId=SPAN.upper(),
                                  parentSpanId=PARENT.upper())))
    encoded = one(request(otlp_span(traceId=b64(TRACE), spanId=b64(SPAN),
                                    parentSpanId=b64(PARENT))))
    assert plain == upper == encoded == expected()
    assert len(b64(TRACE)) == 24 and len(b64(SPAN)) == 12


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8))
def test_any_base64_flavour_decodes_to_the_hex_id(trace: bytes, span: bytes) -> None:
    if not any(trace) or not any(span):
        return  # all-zero ids are invalid by definition
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for strip in (False, True):
            t, s = encode(trace).decode(), encode(span).decode()
            if strip:
                t, s = t.rstrip("="), s.rstrip("=")
            got = one(request(otlp_span(traceId=t, spanId=s)))
            assert (got.trace_id, got.span_id) == (trace.hex(), span.hex())


def test_root_span_has_empty_parent_whether_absent_empty_or_zero() -> None:
    for parent in (None, "", "0" * 16):
        assert one(request(otlp_span(parentSpanId=parent))).parent_span_id == ""


@pytest.mark.parametrize("field, value, reason", [
    ("traceId", "0" * 32, "invalid traceId"),
    ("traceId", "", "invalid traceId"),
    ("traceId", None, "invalid traceId None"),
    ("traceId", "5b8efff798038103d269b633813fc6zz", "invalid traceId"),
    ("traceId", TRACE[:30], "invalid traceId"),
    ("spanId", "0" * 16, "invalid spanId"),
    ("spanId", "!!!!!!!!!!!!", "invalid spanId"),
    ("parentSpanId", "abc", "invalid parentSpanId"),
    ("startTimeUnixNano", "12x", "invalid startTimeUnixNano"),
    ("kind", 9, "invalid kind 9"),
    ("kind", "SERVER", "invalid kind 'SERVER'"),
    ("status", {"code": "BAD"}, "invalid status {'code': 'BAD'}"),
    ("status", "ERROR", "invalid status 'ERROR'"),
    ("name", 5, "name is not a string"),
    ("attributes", {"k": "v"}, "attributes is not a list"),
    ("attributes", [{"key": "n", "value": {"intValue": "1.5"}}], "attribute 'n': invalid intValue"),
    ("attributes", [{"key": "n", "value": {"fooValue": 1}}], "attribute 'n': unknown value field"),
    ("attributes", [{"value": {"intValue": 1}}], "attribute without a string key"),
])
def test_a_bad_span_is_rejected_with_a_specific_reason(field: str, value: Any, reason: str) -> None:
    good = otlp_span("good")
    bad = otlp_span("bad")
    bad[field] = value
    spans, rejected = decoded(request(good, bad))
    assert [s.name for s in spans] == ["good"]
    assert len(rejected) == 1
    assert reason in rejected[0]


# --- shapes and enums ---------------------------------------------------------------------------


def test_tempo_batches_and_instrumentation_library_spans() -> None:
    doc = request(otlp_span(), key="batches", scope_key="instrumentationLibrarySpans")
    assert one(doc) == expected()


@pytest.mark.parametrize("kind, name", [
    (None, "UNSPECIFIED"), (0, "UNSPECIFIED"), (1, "INTERNAL"), (2, "SERVER"), (3, "CLIENT"),
    (4, "PRODUCER"), (5, "CONSUMER"), ("SPAN_KIND_CLIENT", "CLIENT"),
    ("SPAN_KIND_CONSUMER", "CONSUMER"), ("SPAN_KIND_UNSPECIFIED", "UNSPECIFIED"),
])
def test_kind_as_int_or_string_enum(kind: Any, name: str) -> None:
    assert one(request(otlp_span(kind=kind))).kind == name


@pytest.mark.parametrize("status, name", [
    (None, "UNSET"), ({}, "UNSET"), ({"code": 0}, "UNSET"), ({"code": 1}, "OK"),
    ({"code": 2, "message": "boom"}, "ERROR"), ({"code": "STATUS_CODE_OK"}, "OK"),
    ({"code": "STATUS_CODE_ERROR"}, "ERROR"), ({"code": "STATUS_CODE_UNSET"}, "UNSET"),
])
def test_status_as_int_or_string_enum(status: Any, name: str) -> None:
    assert one(request(otlp_span(status=status))).status == name


def test_times_as_strings_or_ints_and_missing_defaults() -> None:
    span = one(request(otlp_span(startTimeUnixNano=10, endTimeUnixNano="2000010")))
    assert (span.start_ns, span.end_ns, span.duration_ms) == (10, 2000010, 2.0)
    bare = one(request({"traceId": TRACE, "spanId": SPAN}, service=None))
    assert bare == Span(TRACE, SPAN, "", kind="UNSPECIFIED")


def test_service_comes_from_the_resource() -> None:
    assert one(request(otlp_span(), service="billing")).service == "billing"
    assert one(request(otlp_span(), service=None)).service is None
    assert one({"resourceSpans": [{"scopeSpans": [{"spans": [otlp_span()]}]}]}).service is None
    assert one(request(otlp_span())).version is None  # (see test_service_version.py)


def test_any_value_types() -> None:
    attrs = [
        {"key": "s", "value": {"stringValue": "text"}},
        {"key": "empty_string", "value": {"stringValue": ""}},
        {"key": "b", "value": {"boolValue": False}},
        {"key": "i", "value": {"intValue": "-9007199254740993"}},
        {"key": "i_num", "value": {"intValue": 42}},
        {"key": "d", "value": {"doubleValue": 2.5}},
        {"key": "d_int", "value": {"doubleValue": 3}},
        {"key": "d_inf", "value": {"doubleValue": "-Infinity"}},
        {"key": "arr", "value": {"arrayValue": {"values": [
            {"stringValue": "a"}, {"intValue": "1"}, {}, {"arrayValue": {}}]}}},
        {"key": "kv", "value": {"kvlistValue": {"values": [
            {"key": "inner", "value": {"boolValue": True}},
            {"key": "nested", "value": {"kvlistValue": {}}},
            {"key": "skipped", "value": {}}]}}},
        {"key": "raw", "value": {"bytesValue": base64.b64encode(b"\x00\xffdata").decode()}},
        {"key": "no_value_field", "value": {}},
        {"key": "no_value"},
    ]
    got = one(request(otlp_span(attributes=attrs))).attributes
    assert got == {
        "s": "text", "empty_string": "", "b": False, "i": -9007199254740993, "i_num": 42,
        "d": 2.5, "d_int": 3.0, "d_inf": -math.inf,
        "arr": ("a", 1, None, ()), "kv": {"inner": True, "nested": {}},
        "raw": b"\x00\xffdata",
    }
    assert type(got["d_int"]) is float and type(got["b"]) is bool


def test_malformed_requests_raise() -> None:
    for doc, reason in [
        ([], "not a JSON object"),
        ({"resourceSpans": {"a": 1}}, "resourceSpans is not a list"),
        ({"batches": "x"}, "batches is not a list"),
        ({"resourceMetrics": []}, "no resourceSpans or batches"),
        ({"resourceSpans": [{"resource": [], "scopeSpans": []}]}, "resource is not an object"),
        ({"resourceSpans": [{"scopeSpans": [{"spans": {}}]}]}, "spans is not a list"),
    ]:
        with pytest.raises(ValueError, match=reason):
            decoded(doc)
    assert decoded({}) == ([], [])


# --- projection ---------------------------------------------------------------------------------


def test_projection_drops_unwanted_spans_before_reading_them() -> None:
    # The unwanted span is malformed past its name: it must be dropped silently, not rejected.
    broken = otlp_span("health", traceId="nope", attributes="garbage")
    wanted = otlp_span(attributes=[
        {"key": "http.method", "value": {"stringValue": "GET"}},
        {"key": "http.route", "value": {"stringValue": "/orders"}},
        {"key": "ignored", "value": {"fooValue": "not decoded either"}},
    ])
    projection = Projection(lambda name: name.startswith("GET"),
                            frozenset({"http.route", "absent"}))
    assert one(request(broken, wanted), projection).attributes == {"http.route": "/orders"}


def test_projection_with_no_attributes_keeps_spans_bare() -> None:
    projection = Projection(lambda name: True, frozenset())
    assert one(request(otlp_span()), projection).attributes == {}
    assert one(request(otlp_span()), Projection.everything()) == expected()


# --- files --------------------------------------------------------------------------------------


def test_malformed_line_in_the_middle_is_reported_and_skipped(tmp_path: Path) -> None:
    bad_span = otlp_span("bad", spanId="xyz")
    path = write_lines(
        tmp_path / "traces.jsonl",
        request(otlp_span("first")),
        "",
        '{"resourceSpans": [{"scopeSpans": ',
        {"resourceSpans": "oops"},
        request(otlp_span("second"), bad_span),
        "   ",
        request(otlp_span("third")),
    )
    errors: list[InputError] = []
    names = [span.name for span in read_spans(str(path), errors=errors)]
    assert names == ["first", "second", "third"]
    assert [(e.source, e.line) for e in errors] == [(str(path), 3), (str(path), 4), (str(path), 5)]
    assert str(errors[0]) == f"{path}:3: invalid JSON: unexpected end of data"
    assert str(errors[1]) == f"{path}:4: resourceSpans is not a list"
    assert str(errors[2]) == f"{path}:5: span 'bad': invalid spanId 'xyz'"


def test_crlf_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "windows.json"
    line = json.dumps(request(otlp_span())).encode()
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\r\n" + line + b"\r\n")
    errors: list[InputError] = []
    assert list(read_spans(str(path), errors=errors)) == [expected(), expected()]
    assert errors == []


def test_gzip_is_detected_by_content(tmp_path: Path) -> None:
    data = "\n".join(json.dumps(request(otlp_span(f"s{i}"))) for i in range(3)).encode()
    for name in ("traces.jsonl.gz", "no-suffix.jsonl"):
        path = tmp_path / name
        path.write_bytes(gzip.compress(data))
        assert [s.name for s in read_spans(str(path))] == ["s0", "s1", "s2"]


def test_truncated_gzip_keeps_what_was_read_and_reports_the_rest(tmp_path: Path) -> None:
    lines = [json.dumps(request(otlp_span(f"s{i}"))) for i in range(200)]
    packed = gzip.compress("\n".join(lines).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    errors: list[InputError] = []
    names = [s.name for s in read_spans(str(path), errors=errors)]
    assert 0 < len(names) < 200 and names == [f"s{i}" for i in range(len(names))]
    assert len(errors) >= 1 and "gzip" in errors[-1].reason


def test_pretty_printed_document(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    doc = request(otlp_span("a"), otlp_span("b", spanId=b64("00000000000000ab")), key="batches")
    path.write_text("\n" + json.dumps(doc, indent=2) + "\n")
    errors: list[InputError] = []
    spans = list(read_spans(str(path), errors=errors))
    assert [(s.name, s.span_id) for s in spans] == [("a", SPAN), ("b", "00000000000000ab")]
    assert errors == []


def test_pretty_printed_document_with_an_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    pristine = json.dumps(request(otlp_span()), indent=2).splitlines()
    text = list(pristine)
    text[5] += ",,"
    path.write_text("\n".join(text))
    errors: list[InputError] = []
    assert list(read_spans(str(path), errors=errors)) == []
    assert len(errors) == 1 and errors[0].line == 6 and "invalid JSON at column" in errors[0].reason
    path.write_text("\n".join(pristine[:9]) + "\n\n")  # cut short: reported at its last line
    errors.clear()
    assert list(read_spans(str(path), errors=errors)) == []
    assert [(e.line, e.reason) for e in errors] == [(9, "invalid JSON: unexpected end of data")]


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = (json.dumps(request(otlp_span("x"))) + "\n").encode() * 2
    for data in (payload, gzip.compress(payload)):
        buffer = io.BytesIO(data)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(buffer))
        assert [s.name for s in read_spans("-")] == ["x", "x"]
        assert not buffer.closed  # stdin belongs to the caller


def test_errors_on_stdin_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"[1,2]\n")))
    errors: list[InputError] = []
    assert list(read_spans("-", errors=errors)) == []
    assert [str(e) for e in errors] == ["<stdin>:1: not a JSON object"]


def test_unreadable_files_raise_oserror_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_spans(str(tmp_path / "missing.jsonl"))
    with pytest.raises(OSError):
        read_spans(str(tmp_path))


def test_empty_and_blank_files_give_nothing(tmp_path: Path) -> None:
    for content in ("", "\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        errors: list[InputError] = []
        assert list(read_spans(str(path), errors=errors)) == [] and errors == []


# --- the typed pass decodes as the lenient one -------------------------------------------------

_VALUES = st.one_of(
    st.fixed_dictionaries({"stringValue": st.text(max_size=5)}),
    st.fixed_dictionaries({"intValue": st.one_of(st.integers(-2**63, 2**63 - 1),
                                                 st.sampled_from(["7", "-3"]))}),
    st.fixed_dictionaries({"boolValue": st.booleans()}),
    st.fixed_dictionaries({"doubleValue": st.sampled_from([1.5, 2, "Infinity"])}),  # NaN != NaN
    st.fixed_dictionaries({"arrayValue": st.fixed_dictionaries(
        {"values": st.lists(st.fixed_dictionaries({"intValue": st.integers(0, 9)}),
                            max_size=2)})}),
    st.sampled_from([{}, {"kvlistValue": {"values": [{"key": "z",
                                                       "value": {"boolValue": True}}]}},
                     {"bytesValue": "AAE="}]))
_ATTRIBUTES = st.lists(st.fixed_dictionaries(
    {"key": st.sampled_from(["k1", "k2", "service.version", "region"]), "value": _VALUES}),
    max_size=4)
_VALID_SPAN = {
    "traceId": st.sampled_from(["5b8efff798038103d269b633813fc60c",
                                "5B8EFFF798038103D269B633813FC60C",
                                b64("0af7651916cd43dd8448eb211c80319c")]),
    "spanId": st.sampled_from([SPAN, b64("b7ad6b7169203331")]),
    "name": st.sampled_from(["a", "b", "c", "betrace.violation"]),
    "startTimeUnixNano": st.sampled_from(["1700000000000000000", 1700000000000000001]),
    "parentSpanId": st.sampled_from([PARENT, "", "0" * 16]),
    "kind": st.sampled_from([0, 2, "SPAN_KIND_CLIENT"]),
    "endTimeUnixNano": st.just("1700000000250000000"),
    "status": st.sampled_from([{}, {"code": 2}, {"code": "STATUS_CODE_OK"},
                               {"code": 1, "message": "m"}]),
    "attributes": _ATTRIBUTES,
}
# one field of a span made invalid: left out, null, or a wrong value
_BROKEN: dict[str, list[Any]] = {
    "traceId": ["xyz", 5, "0" * 32], "spanId": ["abc", [], "0" * 16], "name": [5, ["a"]],
    "startTimeUnixNano": ["soon", -1], "parentSpanId": ["zz"], "kind": [9, "SERVER", 2.5],
    "endTimeUnixNano": ["x"], "status": [{"code": 7}, "x", []],
    "attributes": [{}, "x", 5, [{"key": "k1"}], [{"key": 5, "value": {"intValue": 1}}], ["x"],
                   [{"key": "k1", "value": 5}], [{"key": "k2", "value": {"bogus": 1}}],
                   [{"key": "k1", "value": {"stringValue": 5}}],
                   [{"key": "region", "value": {"intValue": "x"}}]],
}


@st.composite
def _spans(draw: st.DrawFn) -> dict[str, Any]:
    span = {key: draw(values) for key, values in _VALID_SPAN.items()}
    span["events"] = [{"name": "e"}]
    broken = draw(st.sampled_from([None, None, *_BROKEN]))
    if broken is not None:
        change = draw(st.sampled_from(["absent", None, *_BROKEN[broken]]))
        if change == "absent":
            del span[broken]
        else:
            span[broken] = change
    return span


_SPANS = _spans()
_RESOURCE = st.fixed_dictionaries({"attributes": st.lists(st.fixed_dictionaries(
    {"key": st.sampled_from(["service.name", "service.version", "region"]), "value": _VALUES}),
    max_size=3)})
_SCOPES = st.lists(st.fixed_dictionaries({"scope": st.just({"name": "lib"}),
                                          "spans": st.lists(_SPANS, min_size=1, max_size=5)}),
                   min_size=1, max_size=3)
_REQUESTS = st.one_of(
    st.fixed_dictionaries({"resourceSpans": st.lists(
        st.fixed_dictionaries({"resource": _RESOURCE, "scopeSpans": _SCOPES}),
        min_size=1, max_size=3)}),
    st.fixed_dictionaries({"batches": st.lists(
        st.fixed_dictionaries({"instrumentationLibrarySpans": _SCOPES}), max_size=2)}))
# the structure around the spans, malformed
_MALFORMED = [
    {}, [], 5, {"other": 1}, {"resourceSpans": None}, {"resourceSpans": "x"},
    {"resourceSpans": None, "batches": []}, {"resourceSpans": [7]},
    {"resourceSpans": [{"resource": None}]}, {"resourceSpans": [{"resource": "x"}]},
    {"resourceSpans": [{"scopeSpans": 5}]}, {"resourceSpans": [{"scopeSpans": [5]}]},
    {"resourceSpans": [{"scopeSpans": [{"spans": None}]}]},
    {"resourceSpans": [{"scopeSpans": [{"spans": [5, {"name": "a"}]}]}]},
    {"resourceSpans": [{"scopeSpans": None, "instrumentationLibrarySpans": [{"spans": []}]}]},
    {"resourceSpans": [{"resource": {"attributes": [{"key": 3}]}}]},
    {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name",
                                                     "value": {"intValue": "x"}}]}}]},
    {"resourceSpans": [{"resource": {"attributes": [{"key": "service.version",
                                                     "value": {"stringValue": 2}}]}}]},
]
_FILTERS = [
    SpanFilter(Projection.everything()),
    SpanFilter(Projection(lambda name: name == "a", frozenset({"k1"}),
                          lambda name: frozenset({"k1"}))),
    SpanFilter(Projection(lambda name: name in ("a", "b"), frozenset(),
                          lambda name: frozenset(), trace_ids=True),
               since_ns=1700000000000000001, until_ns=2**63, resource_key="region"),
]


@settings(max_examples=400, deadline=None)
@given(doc=_REQUESTS, which=st.integers(0, len(_FILTERS) - 1))
def test_the_typed_pass_decodes_every_request_as_the_lenient_pass(doc: Any, which: int) -> None:
    """decode_json (msgspec, attributes parsed only where kept) against decode_json_request
    (orjson, every field checked): the same spans, counts, ids held and reasons."""
    assert_same_decoding(doc, _FILTERS[which])


@pytest.mark.parametrize("doc", _MALFORMED)
@pytest.mark.parametrize("keep", _FILTERS)
def test_the_typed_pass_refuses_malformed_requests_as_the_lenient_pass(
        doc: Any, keep: SpanFilter) -> None:
    assert_same_decoding(doc, keep)


def assert_same_decoding(doc: Any, keep: SpanFilter) -> None:
    from sidecar.otlp.json_spans import decode_json, decode_json_request

    for text in (json.dumps(doc).encode(), json.dumps(doc, separators=(",", ":")).encode()):
        try:
            reference = decode_json_request(json.loads(text), keep)
        except ValueError as exc:
            with pytest.raises(ValueError) as raised:
                decode_json(text, keep)
            assert str(raised.value) == str(exc)
            continue
        assert decode_json(text, keep) == reference

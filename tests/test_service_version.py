"""Every span keeps its resource's service.version (`Span.version`), as it keeps service.name,
whichever decoder read it; and every signal names the service.name and service.version of its
latest offending span, whatever the rule's context lists (signals can then be grouped by
deploy). The Redis store's records and replay's spilled spans keep the version: see
test_store_contract.py and test_replay_scale.py."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from sidecar.model.spans import Projection
from sidecar.otlp import json_spans
from sidecar.otlp.decoded import Decoded, SpanFilter
from sidecar.otlp.json_spans import decode_json, decode_json_request
from sidecar.otlp.protobuf import ProtobufDecoder

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "rules" / "samples" / "incidents.otlp.jsonl"
TRACE = "5b8efff798038103d269b633813fc60c"

# Every way a decoder meets service.version on a resource, and what Span.version is then: the
# value when it is a string (even empty), else None.
VERSIONS: list[tuple[str, Any, str | None]] = [
    ("string", {"stringValue": "2.14.0"}, "2.14.0"),
    ("empty-string", {"stringValue": ""}, ""),
    ("absent", None, None),
    ("int", {"intValue": "3"}, None),
    ("bool", {"boolValue": True}, None),
    ("double", {"doubleValue": 1.5}, None),
    ("array", {"arrayValue": {"values": [{"stringValue": "2.14.0"}]}}, None),
    ("kvlist", {"kvlistValue": {"values": [{"key": "v", "value": {"stringValue": "2"}}]}},
     None),
    ("bytes", {"bytesValue": "AAE="}, None),
]
# the spans' filters: every attribute, or one attribute of one span name
FILTERS = {
    "everything": SpanFilter(Projection.everything()),
    "narrow": SpanFilter(Projection(lambda name: name == "charge", frozenset({"attempt"}),
                                    lambda name: frozenset({"attempt"}))),
}


def resource_attributes(service: str | None, version: Any) -> list[dict[str, Any]]:
    """OTLP JSON resource attributes: another one first, then service.name and version."""
    out: list[dict[str, Any]] = [{"key": "host.name", "value": {"stringValue": "h1"}}]
    if service is not None:
        out.append({"key": "service.name", "value": {"stringValue": service}})
    if version is not None:
        out.append({"key": "service.version", "value": version})
    return out


def json_request(*resources: tuple[str | None, Any, list[str]]) -> dict[str, Any]:
    """One ResourceSpans per (service, version, span ids), each span a `charge` of TRACE."""
    return {"resourceSpans": [{
        "resource": {"attributes": resource_attributes(service, version)},
        "scopeSpans": [{"scope": {"name": "lib"}, "spans": [
            {"traceId": TRACE, "spanId": span_id, "name": "charge", "kind": 2,
             "startTimeUnixNano": "1700000000000000000",
             "endTimeUnixNano": "1700000000250000000", "status": {},
             "attributes": [{"key": "attempt", "value": {"intValue": "2"}},
                            {"key": "other", "value": {"stringValue": "x"}}]}
            for span_id in span_ids]}]}
        for service, version, span_ids in resources]}


def any_value(json_value: dict[str, Any]) -> AnyValue:
    """The protobuf AnyValue of an OTLP JSON one (the few shapes VERSIONS uses)."""
    ((field, inner),) = json_value.items()
    if field == "stringValue":
        return AnyValue(string_value=inner)
    if field == "intValue":
        return AnyValue(int_value=int(inner))
    if field == "boolValue":
        return AnyValue(bool_value=inner)
    if field == "doubleValue":
        return AnyValue(double_value=inner)
    if field == "bytesValue":
        return AnyValue(bytes_value=json_spans.decode_base64(inner))
    if field == "arrayValue":
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in inner["values"]]))
    assert field == "kvlistValue"
    return AnyValue(kvlist_value=KeyValueList(values=[
        KeyValue(key=kv["key"], value=any_value(kv["value"])) for kv in inner["values"]]))


def protobuf_request(*resources: tuple[str | None, Any, list[str]]) -> bytes:
    """`json_request` as protobuf bytes, built from the proto classes."""
    resource_spans = []
    for service, version, span_ids in resources:
        attributes = [KeyValue(key=kv["key"], value=any_value(kv["value"]))
                      for kv in resource_attributes(service, version)]
        spans = [Span(trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(span_id),
                      name="charge", kind=Span.SPAN_KIND_SERVER,
                      start_time_unix_nano=1700000000000000000,
                      end_time_unix_nano=1700000000250000000,
                      attributes=[KeyValue(key="attempt", value=AnyValue(int_value=2)),
                                  KeyValue(key="other", value=AnyValue(string_value="x"))])
                 for span_id in span_ids]
        resource_spans.append(ResourceSpans(resource=Resource(attributes=attributes),
                                            scope_spans=[ScopeSpans(spans=spans)]))
    return ExportTraceServiceRequest(resource_spans=resource_spans).SerializeToString()


def typed(data: bytes, keep: SpanFilter, monkeypatch: pytest.MonkeyPatch) -> Decoded:
    """decode_json by its typed (msgspec) pass alone: the lenient pass would fail the test."""
    def lenient(*args: Any) -> Decoded:
        raise AssertionError("the typed pass handed the request to the lenient pass")
    with monkeypatch.context() as patched:
        patched.setattr(json_spans, "decode_json_request", lenient)
        return decode_json(data, keep)


DECODERS = ["protobuf", "json-typed", "json-lenient"]


def decode(decoder: str, resources: list[tuple[str | None, Any, list[str]]], keep: SpanFilter,
           monkeypatch: pytest.MonkeyPatch) -> Decoded:
    if decoder == "protobuf":
        return ProtobufDecoder(keep).decode(protobuf_request(*resources))
    data = json.dumps(json_request(*resources)).encode()
    if decoder == "json-typed":
        return typed(data, keep, monkeypatch)
    return decode_json_request(orjson.loads(data), keep)


# --- (a) every decoder keeps the resource's service.version ----------------------------------

@pytest.mark.parametrize("filter_name", list(FILTERS))
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(("label", "version", "expected"), VERSIONS, ids=[v[0] for v in VERSIONS])
def test_span_version_is_the_resources_service_version_when_a_string(
        decoder: str, filter_name: str, label: str, version: Any, expected: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = decode(decoder, [("checkout", version, ["00000000000000a1", "00000000000000a2"])],
                 FILTERS[filter_name], monkeypatch)
    assert out.invalid == []
    spans = out.batch[TRACE]
    assert [(s.service, s.version) for s in spans] == [("checkout", expected)] * 2
    # the version is not an attribute of the span: rules read attributes
    assert all("service.version" not in s.attributes for s in spans)


@pytest.mark.parametrize("decoder", DECODERS)
def test_each_resource_gives_its_own_spans_its_version(
        decoder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two deploys of one service and a resource without a service.name in one request."""
    resources: list[tuple[str | None, Any, list[str]]] = [
        ("checkout", {"stringValue": "2.14.0"}, ["00000000000000a1", "00000000000000a2"]),
        ("checkout", {"stringValue": "2.15.0"}, ["00000000000000b1"]),
        (None, {"stringValue": "0.1.0"}, ["00000000000000c1"]),
        ("cart", None, ["00000000000000d1"]),
    ]
    for keep in FILTERS.values():
        out = decode(decoder, resources, keep, monkeypatch)
        assert out.invalid == []
        assert {s.span_id: (s.service, s.version) for s in out.batch[TRACE]} == {
            "00000000000000a1": ("checkout", "2.14.0"), "00000000000000a2": ("checkout", "2.14.0"),
            "00000000000000b1": ("checkout", "2.15.0"), "00000000000000c1": (None, "0.1.0"),
            "00000000000000d1": ("cart", None)}


def test_the_decoders_agree_on_the_version_with_a_group_by_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--group-by service.version carries the value as the span's group as well."""
    keep = SpanFilter.of(Projection.everything(), group_by="service.version")
    resources: list[tuple[str | None, Any, list[str]]] = [
        ("checkout", {"stringValue": "2.14.0"}, ["00000000000000a1"]),
        ("checkout", {"intValue": "7"}, ["00000000000000b1"])]
    found = {decoder: [(s.version, s.group) for s in
                       decode(decoder, resources, keep, monkeypatch).batch[TRACE]]
             for decoder in DECODERS}
    assert found == {decoder: [("2.14.0", "2.14.0"), (None, 7)] for decoder in DECODERS}


def test_the_trace_stores_entry_keeps_the_version() -> None:
    """The entry point the Tempo and Jaeger backends decode their answers with."""
    out = decode_json_request(json_request(("checkout", {"stringValue": "2.14.0"},
                                            ["00000000000000a1"])), SpanFilter(Projection.everything()))
    assert [(s.service, s.version) for spans in out.batch.values() for s in spans] == [
        ("checkout", "2.14.0")]


def test_an_undecodable_resource_version_is_reported_and_the_spans_still_count() -> None:
    """A resource attribute upb cannot parse: reported once; the spans keep the service."""
    good = protobuf_request(("checkout", {"stringValue": "2.14.0"}, ["00000000000000a1"]))
    request = ExportTraceServiceRequest.FromString(good)
    [version] = [kv for kv in request.resource_spans[0].resource.attributes
                 if kv.key == "service.version"]
    # the lean decoder keeps resource values as bytes: a string value with a broken length
    raw = bytearray(request.SerializeToString())
    value = version.value.SerializeToString()
    at = raw.index(value)
    raw[at + 1] = 0x7F  # the string claims 127 bytes
    out = ProtobufDecoder(FILTERS["everything"]).decode(bytes(raw))
    assert len(out.invalid) == 1 and out.invalid[0].startswith("invalid resource attribute")
    assert [(s.service, s.version) for s in out.batch[TRACE]] == [("checkout", None)]


# --- (d) signals name the deploy of their latest offending span ------------------------------

def sample_spans() -> dict[str, tuple[int, str | None, str | None]]:
    """Each span of the bundled sample by id: its start, service.name and service.version."""
    found = {}
    for line in SAMPLE.read_text().splitlines():
        for resource in json.loads(line)["resourceSpans"]:
            attributes = {kv["key"]: kv["value"].get("stringValue")
                          for kv in resource.get("resource", {}).get("attributes", [])}
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    found[span["spanId"]] = (int(span["startTimeUnixNano"]),
                                             attributes.get("service.name"),
                                             attributes.get("service.version"))
    return found


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "replay", "--rules", "rules/", *args, str(SAMPLE)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")})


def test_replayed_signals_carry_the_latest_offending_spans_service_and_version() -> None:
    result = replay("--format", "jsonl")
    assert result.returncode == 0, result.stderr
    signals = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(signals) == 10
    spans = sample_spans()
    for signal in signals:
        assert list(signal)[-4:] == ["violation_time", "service", "service_version", "rule_digest"]
        latest = max(signal["span_ids"], key=lambda span_id: (spans[span_id][0], span_id))
        _, service, version = spans[latest]
        assert (signal["service"], signal["service_version"]) == (service, version), signal
        assert service is not None and version is not None
    by_rule = {signal["rule_id"]: signal for signal in signals}
    payment = by_rule["payment-retry-idempotency"]
    assert (payment["service"], payment["service_version"]) == ("checkout", "2.14.0")
    # the rule's context lists service.name, and its offending spans come from two services:
    # the signal names the one whose span started last
    http = by_rule["http-5xx-without-error-log"]
    assert http["context"]["service.name"] == ["edge", "orders"]
    assert (http["service"], http["service_version"]) == ("orders", "5.1.2")
    # a rule whose context names no service still says which deploy it was
    agent = by_rule["agent-refund-human-approval"]
    assert "service.name" not in agent["context"]
    assert (agent["service"], agent["service_version"]) == ("support-agent", "0.7.4")


def test_replayed_csv_has_the_service_and_version_columns() -> None:
    jsonl, table = replay("--format", "jsonl"), replay("--format", "csv")
    assert table.returncode == 0, table.stderr
    reader = csv.DictReader(io.StringIO(table.stdout))
    assert reader.fieldnames is not None
    assert reader.fieldnames[9:13] == ["violation_time", "service", "service_version",
                                       "rule_digest"]
    assert reader.fieldnames[13].startswith("context.")
    rows = {(row["rule_id"], row["trace_id"]): (row["service"], row["service_version"])
            for row in reader}
    assert rows == {(s["rule_id"], s["trace_id"]): (s["service"], s["service_version"])
                    for s in map(json.loads, jsonl.stdout.splitlines())}

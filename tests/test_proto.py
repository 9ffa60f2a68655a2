"""proto/betrace/v1/signal.proto against the code generated from it and against the signal log.

The generated Python code under sidecar/proto/ is committed. After changing any .proto under
proto/, regenerate it from the repository root with (grpcio-tools comes with the `test` extras):

    .venv/bin/python -m grpc_tools.protoc -Iproto --python_out=sidecar/proto \\
        --pyi_out=sidecar/proto proto/betrace/v1/signal.proto

These tests regenerate it into a temporary directory with that same command and compare, byte for
byte and as FileDescriptorProtos; they check that every line of the real signal log parses as
the `betrace.v1.Signal` JSON mapping and maps back to the same JSON object; and that the Signal
dataclass and the message have the same fields in the same order.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import FieldDescriptor

from sidecar.model.signal_writers import JsonLinesWriter
from sidecar.model.signals import Signal, signal_id
from sidecar.otlp.signals import signal_message
from sidecar.proto.betrace.v1 import signal_pb2

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
GENERATED_ROOT = REPO / "sidecar" / "proto"
PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
SAMPLE = REPO / "rules" / "samples" / "incidents.otlp.jsonl"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
REGENERATE = ("python -m grpc_tools.protoc -Iproto --python_out=sidecar/proto "
              "--pyi_out=sidecar/proto " + " ".join(f"proto/{p}" for p in PROTOS))


# --- the generated code is in sync with the .proto ----------------------------------------------

@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """protoc run afresh over every .proto (the documented command, from the repository root),
    into a temporary directory that also holds the FileDescriptorSet as `descriptors.pb`."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("grpc_tools", reason="grpcio-tools (the `test` extras) is needed")
    out = tmp_path_factory.mktemp("generated")
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={out}",
         f"--pyi_out={out}", f"--descriptor_set_out={out / 'descriptors.pb'}",
         *(f"proto/{p}" for p in PROTOS)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return out


def _generated_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)}


def test_there_is_a_proto() -> None:
    assert "betrace/v1/signal.proto" in PROTOS


def test_committed_code_is_byte_for_byte_what_protoc_generates(regenerated: Path) -> None:
    fresh, committed = _generated_files(regenerated), _generated_files(GENERATED_ROOT)
    assert fresh, "protoc generated nothing"
    assert committed == fresh, (f"sidecar/proto/ has {sorted(committed)} but the .proto files "
                                f"generate {sorted(fresh)}; regenerate with: {REGENERATE}")
    for name in sorted(fresh):
        new, old = (regenerated / name).read_bytes(), (GENERATED_ROOT / name).read_bytes()
        if new != old:
            versions = [re.search(rb"Protobuf Python Version: (\S+)", text) for text in (old, new)]
            detail = " ".join(f"{label} by protobuf {m.group(1).decode()}" for label, m
                              in zip(("committed: generated", "installed: generates"), versions)
                              if m)
            pytest.fail(f"sidecar/proto/{name} is out of date ({detail}); regenerate with: "
                        f"{REGENERATE}")


def _embedded_descriptor(module_source: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a generated *_pb2.py embeds (its AddSerializedFile argument),
    read without importing the module."""
    calls = [node for node in ast.walk(ast.parse(module_source))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "AddSerializedFile"]
    assert len(calls) == 1
    return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(calls[0].args[0]))


def test_committed_descriptors_equal_the_protos(regenerated: Path) -> None:
    """Robust to the generator's own text (comments, version header): the schema embedded in
    each committed module is the schema protoc compiles from the .proto today, and the imported
    module carries that same schema."""
    fresh_set = descriptor_pb2.FileDescriptorSet.FromString(
        (regenerated / "descriptors.pb").read_bytes())
    assert sorted(f.name for f in fresh_set.file) == PROTOS
    for proto in PROTOS:
        module = proto.removesuffix(".proto") + "_pb2.py"
        fresh = _embedded_descriptor((regenerated / module).read_text())
        committed = _embedded_descriptor((GENERATED_ROOT / module).read_text())
        assert fresh.name == proto
        assert committed == fresh, (
            f"sidecar/proto/{module} is out of date; regenerate with: {REGENERATE}")
    imported = descriptor_pb2.FileDescriptorProto.FromString(signal_pb2.DESCRIPTOR.serialized_pb)
    assert imported == _embedded_descriptor(
        (GENERATED_ROOT / "betrace/v1/signal_pb2.py").read_text())


def test_generated_package_imports_cleanly() -> None:
    """A fresh interpreter, warnings as errors: the package imports without sys.path tricks and
    the generated code's protobuf runtime version check passes."""
    code = ("from sidecar.proto.betrace.v1.signal_pb2 import Signal; "
            "assert Signal.DESCRIPTOR.full_name == 'betrace.v1.Signal'")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- the dataclass and the message have the same fields -----------------------------------------

def test_dataclass_and_message_have_the_same_fields_in_the_same_order() -> None:
    message_fields = [f.name for f in signal_pb2.Signal.DESCRIPTOR.fields]
    assert message_fields == [f.name for f in dataclasses.fields(Signal)]
    assert [f.number for f in signal_pb2.Signal.DESCRIPTOR.fields] == list(
        range(1, len(message_fields) + 1))


def test_field_kinds_match_the_dataclass_types() -> None:
    """`list[str]` is a repeated string, `dict` a Struct, `X | None` a field with presence (JSON
    null means absent), and everything else a plain string."""
    hints = typing.get_type_hints(Signal)
    for field in signal_pb2.Signal.DESCRIPTOR.fields:
        hint = hints[field.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list:
            assert field.is_repeated, field.name
            assert field.type == FieldDescriptor.TYPE_STRING and args == (str,), field.name
        elif typing.get_origin(hint) is dict:
            assert field.message_type.full_name == "google.protobuf.Struct", field.name
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):
            assert set(args) == {str, type(None)}, field.name
            assert field.type == FieldDescriptor.TYPE_STRING and field.has_presence, field.name
        else:
            assert hint is str, field.name
            assert field.type == FieldDescriptor.TYPE_STRING, field.name
            assert not field.is_repeated, field.name
            assert not field.has_presence, field.name


# --- the signal log is the message's JSON mapping -----------------------------------------------

def _mapped(line: str) -> tuple[signal_pb2.Signal, dict[str, Any]]:
    """The log line parsed strictly as the message, and the message printed back as JSON."""
    message = json_format.Parse(line, signal_pb2.Signal(), ignore_unknown_fields=False)
    printed = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    return message, printed


def _expected(obj: dict[str, Any]) -> dict[str, Any]:
    """The log's object as the JSON mapping prints it: a field with presence that the log writes
    as null is simply absent (proto3 JSON reads null as "not set")."""
    fields = signal_pb2.Signal.DESCRIPTOR.fields_by_name
    return {k: v for k, v in obj.items() if not (v is None and fields[k].has_presence)}


def _assert_line_is_the_mapping(line: str) -> signal_pb2.Signal:
    obj = json.loads(line)
    message, printed = _mapped(line)
    expected = _expected(obj)
    assert printed == expected
    assert list(expected) == [f.name for f in signal_pb2.Signal.DESCRIPTOR.fields
                              if f.name in expected]  # the log writes them in field order
    assert signal_pb2.Signal.FromString(message.SerializeToString()) == message
    return message


def test_every_line_of_the_replayed_signal_log_is_the_json_mapping() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "replay", "--rules", "rules/", "--format", "jsonl",
         str(SAMPLE)], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) >= 5, result.stdout
    for line in lines:
        message = _assert_line_is_the_mapping(line)
        assert message.mode == "replay"
        assert message.HasField("violation_time")
        # every resource of the sample names its service and version
        assert message.HasField("service") and message.HasField("service_version")
    assert any(isinstance(v, list) for line in lines for v in json.loads(line)["context"].values())


def _signal(**changes: Any) -> Signal:
    base = Signal(
        signal_id=signal_id("payment-retry-idempotency", "d1c9ec7c629edbb241be438db209791e"),
        rule_id="payment-retry-idempotency",
        rule_name="Payment retry must reuse its payment_intent_id", severity="critical",
        trace_id="d1c9ec7c629edbb241be438db209791e",
        span_ids=["a81d25e4a9e4e429", "dfa7843e149d5ac3"],
        message="Payment retry used a different payment_intent_id (possible double charge)",
        context={"order_id": "ord_81723", "payment_intent_id": ["pi_3Q1abcR", "pi_3Q2xyzS"],
                 "attempt": [1, 2], "amount_cents": 12999},
        mode="replay", detected_at="2026-11-23T11:33:40.236Z",
        violation_time="2026-10-09T09:31:05.431Z", service="checkout",
        service_version="2.14.0", rule_digest="e2560d4e72ff00e9")
    return dataclasses.replace(base, **changes)


def _log_line(signal: Signal) -> str:
    out = io.StringIO()
    JsonLinesWriter(out).write(signal)
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    return text[:-1]


def test_the_readme_signal_is_written_as_before_and_is_the_json_mapping() -> None:
    line = _log_line(_signal())
    assert line == (
        '{"signal_id": "bc93e6d0-2ea1-5220-bdb6-9d9607b360f4", '
        '"rule_id": "payment-retry-idempotency", '
        '"rule_name": "Payment retry must reuse its payment_intent_id", "severity": "critical", '
        '"trace_id": "d1c9ec7c629edbb241be438db209791e", '
        '"span_ids": ["a81d25e4a9e4e429", "dfa7843e149d5ac3"], '
        '"message": "Payment retry used a different payment_intent_id (possible double charge)", '
        '"context": {"order_id": "ord_81723", "payment_intent_id": ["pi_3Q1abcR", "pi_3Q2xyzS"], '
        '"attempt": [1, 2], "amount_cents": 12999}, '
        '"mode": "replay", "detected_at": "2026-11-23T11:33:40.236Z", '
        '"violation_time": "2026-10-09T09:31:05.431Z", '
        '"service": "checkout", "service_version": "2.14.0", "rule_digest": "e2560d4e72ff00e9"}')
    assert _assert_line_is_the_mapping(line) == signal_message(_signal())


@pytest.mark.parametrize("changes", [
    pytest.param({"span_ids": [], "violation_time": None, "service": None,
                  "service_version": None}, id="no-offending-span"),
    pytest.param({"service_version": None}, id="no-service-version"),
    pytest.param({"service": "", "service_version": "naïve ✓"}, id="empty-and-unicode-service"),
    pytest.param({"context": {}}, id="no-context"),
    pytest.param({"context": {"tenant_id": None, "ok": True, "ratio": 0.25, "n": -3}},
                 id="null-bool-float-int"),
    pytest.param({"context": {"attempt": (1, 2), "labels": {"a": "x", "b": [1.5, None]}}},
                 id="tuple-and-kvlist"),
    pytest.param({"context": {"raw": b"\x00\xff", "text": "naïve ✓"}}, id="bytes-and-unicode"),
    pytest.param({"mode": "live", "severity": "info", "message": ""}, id="live-info-empty"),
])
def test_edge_cases_of_the_log_are_the_json_mapping(changes: dict[str, Any]) -> None:
    signal = _signal(**changes)
    message = _assert_line_is_the_mapping(_log_line(signal))
    assert message == signal_message(signal)
    assert message.HasField("violation_time") == (signal.violation_time is not None)
    assert message.HasField("service") == (signal.service is not None)
    assert message.HasField("service_version") == (signal.service_version is not None)
    assert message.HasField("context")


def test_unknown_fields_in_a_line_are_rejected() -> None:
    obj = json.loads(_log_line(_signal()))
    obj["extra"] = 1
    with pytest.raises(json_format.ParseError):
        json_format.Parse(json.dumps(obj), signal_pb2.Signal(), ignore_unknown_fields=False)

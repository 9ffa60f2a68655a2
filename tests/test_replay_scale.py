"""`betrace replay` at scale, run for real: both file-exporter formats, compressed or not, spread
over files, directories and globs; a memory budget that forces spilling; one or two processes;
corrupt input; --since/--until, --group-by, progress. Results must not depend on any of it."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from sidecar.model.errors import SourceError
from sidecar.model.moments import parse_moment
from sidecar.otlp.decoded import SpanFilter
from sidecar.otlp.json_spans import decode_json_request
from sidecar.replay.sources import expand_sources, read_source
from sidecar.rules import load_rules_text

REPO = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE, EXIT_SKIPPED_INPUT = 0, 1, 2, 3
BASE_NS = 1_738_368_000 * 10**9  # 2025-02-01T00:00:00Z
MINUTE = 60 * 10**9
RULES = """\
rules:
  - id: payment-retry-idempotency
    severity: critical
    condition: |
      trace.has(payment.charge).where(attempt > 1)
        and trace.count(payment.charge).where(payment_intent_id == unique) > 1
    signal:
      message: Payment retry used a different payment_intent_id
      context: [order_id, payment_intent_id, attempt]
  - id: admin-action-audit-log
    severity: high
    when: trace.has(admin.action)
    always: trace.has(audit.log)
    signal:
      context: [admin.operation, service.name]
"""

# --- a small OmniCart: traces, their spans, and the two formats -------------------------------


def value(raw: Any) -> AnyValue:
    if isinstance(raw, bool):
        return AnyValue(bool_value=raw)
    if isinstance(raw, int):
        return AnyValue(int_value=raw)
    if isinstance(raw, float):
        return AnyValue(double_value=raw)
    if isinstance(raw, bytes):
        return AnyValue(bytes_value=raw)
    if isinstance(raw, list):
        return AnyValue(array_value=ArrayValue(values=[value(v) for v in raw]))
    if isinstance(raw, dict):
        return AnyValue(kvlist_value=KeyValueList(values=attributes(raw)))
    return AnyValue(string_value=raw)


def attributes(raw: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=value(v)) for k, v in raw.items()]


def span(trace_id: bytes, name: str, start_ns: int, service: str, code: int = 0,
         **attrs: Any) -> tuple[str, dict[str, Any], Span]:
    """A span with the service and resource attributes of the ResourceSpans it goes in."""
    resource = {"service.name": service}
    if "resource_version" in attrs:
        resource["service.version"] = attrs.pop("resource_version")
    message = Span(trace_id=trace_id, span_id=random.randbytes(8), parent_span_id=random.randbytes(8),
                   name=name, kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=start_ns,
                   end_time_unix_nano=start_ns + 5_000_000, attributes=attributes(attrs),
                   status=Status(code=code, message="timeout" if code == 2 else ""))
    return service, resource, message


def omnicart(traces: int, seed: int = 7) -> tuple[list[tuple[str, dict[str, Any], Span]],
                                                   set[tuple[str, str]]]:
    """Payment traces (a tenth retry under a new intent: violations), admin actions (every
    third without an audit log), and traffic no rule names; shuffled. Also the expected
    (rule, trace id) pairs."""
    random.seed(seed)
    spans, expected = [], set()
    for number in range(traces):
        trace_id, start = random.randbytes(16), BASE_NS + number * MINUTE
        version = "v2.15.0" if number % 2 else "v2.14.0"
        if number % 3 == 2:
            spans.append(span(trace_id, "admin.action", start, "admin-api",
                              **{"admin.operation": "role_change"}))
            if number % 9 != 2:
                spans.append(span(trace_id, "audit.log", start + 1000, "audit"))
            else:
                expected.add(("admin-action-audit-log", trace_id.hex()))
            continue
        spans.append(span(trace_id, "POST /checkout", start, "checkout", http_status=200))
        attempts = 1 + number % 3
        violating = attempts > 1 and number % 10 in (1, 4)
        for attempt in range(1, attempts + 1):
            intent = f"pi_{number}_{attempt if violating else 1}"
            # the version sits on the span for some, only on the resource for others
            where = {"service.version": version} if number % 4 else {"resource_version": version}
            spans.append(span(trace_id, "payment.charge", start + attempt * 1000, "payments",
                              code=2 if attempt < attempts else 0, attempt=attempt,
                              payment_intent_id=intent, order_id=f"ord_{number}",
                              amount_cents=4999 + number, **where))
        if violating:
            expected.add(("payment-retry-idempotency", trace_id.hex()))
        spans.append(span(trace_id, "GET /catalog", start + 5, "frontend"))
    random.shuffle(spans)
    return spans, expected


def requests(spans: list[tuple[str, dict[str, Any], Span]], per_request: int = 7
             ) -> list[ExportTraceServiceRequest]:
    """Batches as a collector makes them: one ResourceSpans per service."""
    out = []
    for first in range(0, len(spans), per_request):
        groups: dict[str, tuple[dict[str, Any], list[Span]]] = {}
        for service, resource, message in spans[first:first + per_request]:
            key = json.dumps(resource, sort_keys=True)
            groups.setdefault(key, (resource, []))[1].append(message)
        out.append(ExportTraceServiceRequest(resource_spans=[
            ResourceSpans(resource={"attributes": attributes(resource)},
                          scope_spans=[ScopeSpans(scope={"name": "test"}, spans=group)])
            for resource, group in groups.values()]))
    return out


def frames(reqs: Iterable[ExportTraceServiceRequest], compress_each: bool = False) -> bytes:
    """The file exporter's `format: proto`: each request preceded by its length, 4 bytes
    big-endian; with its legacy `compression: zstd`, each request compressed first."""
    out = []
    for request in reqs:
        body = request.SerializeToString()
        if compress_each:
            body = zstandard.ZstdCompressor().compress(body)
        out.append(struct.pack(">I", len(body)) + body)
    return b"".join(out)


def json_lines(reqs: Iterable[ExportTraceServiceRequest]) -> bytes:
    """The file exporter's `format: json` (ids in base64, as protobuf's JSON mapping has them)."""
    return b"".join(json.dumps(MessageToDict(r)).encode() + b"\n" for r in reqs)


def betrace(*args: str | Path, stdin: bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
    result = subprocess.run([sys.executable, "-m", "sidecar", *map(str, args)], cwd=REPO,
                            input=stdin, capture_output=True, timeout=timeout, env=env,
                            check=False)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                       result.stderr.decode())


def signals(stdout: str) -> list[dict[str, Any]]:
    """Signals without their detection time, which is the clock's."""
    return [{k: v for k, v in json.loads(line).items() if k != "detected_at"}
            for line in stdout.splitlines()]


def summary(stderr: str) -> list[str]:
    """The per-rule summary lines (not timing, spilling or progress)."""
    return [line for line in stderr.splitlines() if line.startswith("  ")
            and not line.startswith("  spilled ")]


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture(scope="module")
def shop() -> tuple[list[ExportTraceServiceRequest], set[tuple[str, str]]]:
    spans, expected = omnicart(120)
    return requests(spans), expected


def spread(reqs: list[ExportTraceServiceRequest], folder: Path) -> list[Path]:
    """The requests dealt round-robin over six files in every format the reader knows, so each
    trace is spread over files and formats."""
    folder.mkdir()
    writers = [
        ("plain.jsonl", json_lines),
        ("plain.pb", frames),
        ("packed.jsonl.gz", lambda r: gzip.compress(json_lines(r))),
        ("packed.pb.zst", lambda r: zstandard.ZstdCompressor().compress(frames(r))),
        ("legacy-compressed.pb", lambda r: frames(r, compress_each=True)),
        ("no-suffix", lambda r: gzip.compress(frames(r))),
    ]
    paths = []
    for number, (name, write) in enumerate(writers):
        path = folder / name
        path.write_bytes(write(reqs[number::len(writers)]))
        paths.append(path)
    return paths


# --- results do not depend on format, files, jobs or memory -------------------------------------


def test_formats_and_files_give_the_signals_of_one_file(
        rules: Path, tmp_path: Path, shop: tuple[list[ExportTraceServiceRequest], set[Any]]) -> None:
    reqs, expected = shop
    one = tmp_path / "all.jsonl"
    one.write_bytes(json_lines(reqs))
    baseline = betrace("replay", "--rules", rules, "--jobs", "1", one)
    assert baseline.returncode == EXIT_OK, baseline.stderr
    found = signals(baseline.stdout)
    assert {(s["rule_id"], s["trace_id"]) for s in found} == expected
    assert len(found) == len(expected) > 10
    assert found == sorted(found, key=lambda s: (s["rule_id"], s["violation_time"], s["trace_id"]))
    paths = spread(reqs, tmp_path / "mixed")
    for jobs in ("1", "2"):
        mixed = betrace("replay", "--rules", rules, "--jobs", jobs, *reversed(paths))
        assert mixed.returncode == EXIT_OK, mixed.stderr
        assert signals(mixed.stdout) == found
        assert summary(mixed.stderr) == summary(baseline.stderr)


def test_a_tiny_memory_budget_spills_and_changes_nothing(
        rules: Path, tmp_path: Path, shop: tuple[list[ExportTraceServiceRequest], set[Any]]) -> None:
    reqs, _ = shop
    paths = spread(reqs, tmp_path / "data")
    spill = tmp_path / "spill"
    spill.mkdir()
    runs = {}
    for jobs, memory in (("1", "1G"), ("1", "2K"), ("2", "1G"), ("2", "2K")):
        result = betrace("replay", "--rules", rules, "--group-by", "service.version", "--jobs",
                         jobs, "--memory", memory, "--spill-dir", spill, *paths)
        assert result.returncode == EXIT_OK, result.stderr
        assert list(spill.iterdir()) == [], "the temp directory is removed"
        runs[jobs, memory] = result
    assert "spilled" not in runs["1", "1G"].stderr  # one process within budget: no disk at all
    for key in (("1", "2K"), ("2", "1G"), ("2", "2K")):
        assert re.search(r"spilled \d+\.\d MiB to disk", runs[key].stderr), key
        assert signals(runs[key].stdout) == signals(runs["1", "1G"].stdout), key
        assert summary(runs[key].stderr) == summary(runs["1", "1G"].stderr), key
    for key, result in runs.items():  # spilled spans keep their resource's service.version
        assert deploys(signals(result.stdout)) == deploys(signals(runs["1", "1G"].stdout)), key
        assert all(found == expected for found, expected in deploys(signals(result.stdout))), key
        assert "v2.14.0" in {found[1] for found, _ in deploys(signals(result.stdout))}, key


def deploys(found: list[dict[str, Any]]) -> list[tuple[tuple[str, str | None],
                                                        tuple[str, str | None]]]:
    """Each signal's (service, service_version), and what `omnicart` gave its latest offending
    span: a payment charge's resource has the version for every fourth trace (the others have
    it on the span, which a signal does not read); an admin action's never has one."""
    out = []
    for one in found:
        if one["rule_id"] == "admin-action-audit-log":
            expected: tuple[str, str | None] = ("admin-api", None)
        else:
            number = int(one["context"]["order_id"].removeprefix("ord_"))
            expected = ("payments", None if number % 4 else
                        "v2.15.0" if number % 2 else "v2.14.0")
        out.append(((one["service"], one["service_version"]), expected))
    return out


def test_group_by_reads_the_span_then_its_resource(
        rules: Path, tmp_path: Path, shop: tuple[list[ExportTraceServiceRequest], set[Any]]) -> None:
    reqs, expected = shop
    data = tmp_path / "t.pb"
    data.write_bytes(frames(reqs))
    result = betrace("replay", "--rules", rules, "--group-by", "service.version", data)
    assert result.returncode == EXIT_OK, result.stderr
    blocks: dict[str, dict[str, int]] = {}
    for line in summary(result.stderr):
        if rule := re.match(r"  (\S+): \d+ violation", line):
            block = blocks[rule[1]] = {}
        elif group := re.fullmatch(r"    service\.version=(\S+): (\d+) \(\d+\.\d%\)", line):
            block[group[1]] = int(group[2])
    payments = sum(rule == "payment-retry-idempotency" for rule, _ in expected)
    # violating payments run on both versions (on the span or only on the resource); the
    # admin rule's spans carry none
    assert set(blocks["payment-retry-idempotency"]) == {"v2.14.0", "v2.15.0"}
    assert sum(blocks["payment-retry-idempotency"].values()) == payments
    assert blocks["admin-action-audit-log"] == {"(none)": len(expected) - payments}
    by_service = betrace("replay", "--rules", rules, "--group-by", "service.name", data)
    assert "    service.name=admin-api: " in by_service.stderr
    assert "    service.name=payments: " in by_service.stderr


def test_stdin_takes_proto_too(rules: Path, tmp_path: Path,
                               shop: tuple[list[Any], set[Any]]) -> None:
    reqs, expected = shop
    alone = betrace("replay", "--rules", rules, "-",
                    stdin=zstandard.ZstdCompressor().compress(frames(reqs)))
    assert alone.returncode == EXIT_OK, alone.stderr
    assert {(s["rule_id"], s["trace_id"]) for s in signals(alone.stdout)} == expected
    rest = tmp_path / "rest.jsonl"
    rest.write_bytes(json_lines(reqs[1::2]))
    for jobs in ("1", "2"):  # with two processes, one of them reads this one's stdin
        result = betrace("replay", "--rules", rules, "--jobs", jobs, rest, "-",
                         stdin=frames(reqs[::2]))
        assert result.returncode == EXIT_OK, result.stderr
        assert signals(result.stdout) == signals(alone.stdout)


def test_a_span_written_twice_counts_once(tmp_path: Path,
                                          shop: tuple[list[Any], set[Any]]) -> None:
    """A collector retrying an Export makes its file exporter write the spans again."""
    reqs, expected = shop
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES + "  - id: too-many-charges\n    condition: count(payment.charge) > 3\n")
    first, again = tmp_path / "first.pb", tmp_path / "again.jsonl"
    first.write_bytes(frames(reqs))
    again.write_bytes(json_lines(reqs))
    for jobs in ("1", "2"):
        result = betrace("replay", "--rules", rules, "--jobs", jobs, first, again)
        assert result.returncode == EXIT_OK, result.stderr
        assert {(s["rule_id"], s["trace_id"]) for s in signals(result.stdout)} == expected
        assert "  too-many-charges: 0 violation(s)" in result.stderr


# --- bad input ----------------------------------------------------------------------------------


def test_corrupt_frames_and_lines_are_located_counted_and_skipped(
        rules: Path, tmp_path: Path, shop: tuple[list[ExportTraceServiceRequest], set[Any]]) -> None:
    reqs, expected = shop
    good = [struct.pack(">I", len(b)) + b for b in (r.SerializeToString() for r in reqs)]
    garbage = b"\xff\xfe this is not protobuf \x00"
    half = len(good) // 2
    body = b"".join(good[:half]) + struct.pack(">I", len(garbage)) + garbage
    corrupt_at = len(b"".join(good[:half]))
    lines = json_lines(reqs[half:]).splitlines(keepends=True)
    # the first half as proto with a bad frame and a truncated last frame, the second half
    # as JSON with one broken line
    cut = good[half][: len(good[half]) // 2]
    proto, text = tmp_path / "bad.pb", tmp_path / "bad.jsonl"
    proto.write_bytes(body + cut)
    text.write_bytes(b"".join(lines[:3]) + b'{"resourceSpans": [\n' + b"".join(lines[3:]))
    for jobs in ("1", "2"):
        result = betrace("replay", "--rules", rules, "--jobs", jobs, proto, text)
        assert result.returncode == EXIT_SKIPPED_INPUT, result.stderr
        reported = [x for x in result.stderr.splitlines() if x.startswith("betrace: ")]
        assert reported == [
            (f"betrace: {proto}@{corrupt_at}: not an OTLP ExportTraceServiceRequest "
             f"({len(garbage)} bytes): Wire format was corrupt"),
            (f"betrace: {proto}@{corrupt_at + 4 + len(garbage)}: truncated frame: "
             f"{len(cut) - 4} of {len(good[half]) - 4} bytes; nothing follows"),
            f"betrace: {text}:4: invalid JSON: unexpected end of data",
        ]
        assert "skipped 3 malformed input item(s)" in result.stderr
        found = {(s["rule_id"], s["trace_id"]) for s in signals(result.stdout)}
        assert 0 < len(found) and found <= expected  # everything else was still evaluated
    with_fail = betrace("replay", "--rules", rules, "--fail-on-violation", proto, text)
    assert with_fail.returncode == EXIT_FAILED  # violations win over skipped input


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand to carry bytes no encoder would."""
    size, length = len(payload), b""
    while size > 0x7F:
        length += bytes([size & 0x7F | 0x80])
        size >>= 7
    return bytes([number << 3 | 2]) + length + bytes([size]) + payload


def test_a_bad_status_or_resource_value_skips_that_item_not_the_run(
        rules: Path, tmp_path: Path) -> None:
    """Garbage where a Status or a resource AnyValue belongs is reported, and the rest of the
    request is still read: the span with the bad status is skipped, the spans under the bad
    resource are kept (without a service)."""
    def admin(trace: int) -> bytes:
        return Span(trace_id=bytes([trace]) * 16, span_id=bytes([trace]) * 8,
                    name="admin.action", start_time_unix_nano=BASE_NS,
                    end_time_unix_nano=BASE_NS + 1).SerializeToString()

    bad_status = admin(1) + field(15, b"\xff\xff")
    bad_resource = field(1, field(1, b"service.name") + field(2, b"\xff\xff"))
    request = (field(1, field(2, field(2, bad_status) + field(2, admin(2))))
               + field(1, field(1, bad_resource) + field(2, field(2, admin(3)))))
    path = tmp_path / "odd.pb"
    path.write_bytes(struct.pack(">I", len(request)) + request)
    result = betrace("replay", "--rules", rules, path)
    assert result.returncode == EXIT_SKIPPED_INPUT, result.stderr
    reported = [x for x in result.stderr.splitlines() if x.startswith("betrace: ")]
    assert reported == [
        f"betrace: {path}@0: span 'admin.action': invalid attribute or status: Wire format was "
        "corrupt",
        f"betrace: {path}@0: invalid resource attribute: Wire format was corrupt"]
    assert {s["trace_id"] for s in signals(result.stdout)} == {"02" * 16, "03" * 16}


def test_an_implausible_frame_length_ends_that_file_only(rules: Path, tmp_path: Path,
                                                          shop: tuple[list[Any], set[Any]]) -> None:
    reqs, expected = shop
    broken, whole = tmp_path / "broken.pb", tmp_path / "whole.pb"
    broken.write_bytes(frames(reqs[:3]) + b"\x7f\xff\xff\xff" + frames(reqs))
    whole.write_bytes(frames(reqs))
    result = betrace("replay", "--rules", rules, broken, whole)
    assert result.returncode == EXIT_SKIPPED_INPUT
    assert (f"betrace: {broken}@{len(frames(reqs[:3]))}: frame length 2147483647 is not "
            "plausible (corrupt data?); the rest of this file is skipped") in result.stderr
    assert {(s["rule_id"], s["trace_id"]) for s in signals(result.stdout)} == expected


# --- sources: directories, globs, time windows --------------------------------------------------


def test_directories_and_globs(rules: Path, tmp_path: Path,
                               shop: tuple[list[ExportTraceServiceRequest], set[Any]]) -> None:
    reqs, expected = shop
    tree = tmp_path / "collector"
    (tree / "day1").mkdir(parents=True)
    (tree / ".hidden").mkdir()
    (tree / "day1" / "a.pb").write_bytes(frames(reqs[::2]))
    (tree / "b.jsonl").write_bytes(json_lines(reqs[1::2]))
    (tree / ".partial-0").write_bytes(b"garbage being written")  # hidden: skipped
    (tree / ".hidden" / "c.jsonl").write_bytes(b"garbage")
    assert expand_sources([str(tree)]) == [str(tree / "b.jsonl"), str(tree / "day1" / "a.pb")]
    for source in ([tree], [f"{tmp_path}/col*"], [f"{tree}/**/*.pb", f"{tree}/*.jsonl", tree]):
        result = betrace("replay", "--rules", rules, *source)
        assert result.returncode == EXIT_OK, result.stderr
        assert {(s["rule_id"], s["trace_id"]) for s in signals(result.stdout)} == expected
        assert "from 2 source(s)" in result.stderr  # each file once
    nothing = betrace("replay", "--rules", rules, f"{tmp_path}/*.nope")
    assert nothing.returncode == EXIT_UNUSABLE and nothing.stdout == ""
    assert f"betrace: {tmp_path}/*.nope: no file matches" in nothing.stderr
    (tmp_path / "empty").mkdir()
    empty = betrace("replay", "--rules", rules, tmp_path / "empty")
    assert empty.returncode == EXIT_UNUSABLE
    assert f"betrace: {tmp_path / 'empty'}: no files in this directory" in empty.stderr


def test_since_and_until_filter_spans_by_start(rules: Path, tmp_path: Path,
                                               shop: tuple[list[Any], set[Any]]) -> None:
    reqs, expected = shop
    data = tmp_path / "t.pb"
    data.write_bytes(frames(reqs))
    # traces start a minute apart from BASE_NS; keep those starting in minutes [30, 60)
    window = ("--since", "2025-02-01T00:30:00Z", "--until", "2025-02-01T01:00:00+00:00")
    result = betrace("replay", "--rules", rules, *window, data)
    assert result.returncode == EXIT_OK, result.stderr
    inside = {(s["rule_id"], s["trace_id"]) for s in signals(result.stdout)}
    assert inside and inside < expected
    all_times = {(s["rule_id"], s["trace_id"]): s["violation_time"]
                 for s in signals(betrace("replay", "--rules", rules, data).stdout)}
    assert inside == {k for k, t in all_times.items() if "T00:30" <= t[10:16] < "T01:00"}
    # relative: everything is older than a day, none older than ~300 years
    assert betrace("replay", "--rules", rules, "--since", "1d", data).stdout == ""
    assert len(signals(betrace("replay", "--rules", rules, "--since", "100000d",
                               data).stdout)) == len(expected)
    bad = betrace("replay", "--rules", rules, "--since", "yesterday", data)
    assert bad.returncode == EXIT_UNUSABLE
    assert "betrace: invalid time 'yesterday': expected an RFC 3339 timestamp" in bad.stderr
    backwards = betrace("replay", "--rules", rules, "--since", "2h", "--until", "3h", data)
    assert backwards.returncode == EXIT_UNUSABLE
    assert "--since must be before --until" in backwards.stderr


def test_a_trace_crossing_the_range_edge_is_evaluated_whole(rules: Path,
                                                            tmp_path: Path) -> None:
    """An admin.action just before --until and its audit.log just after: cut at the edge, the
    trace would look unaudited. Spans within --edge are read, so it is evaluated whole; a trace
    with no span in the range is not evaluated at all."""
    until = BASE_NS + 60 * MINUTE
    crossing, outside = b"\x0c" * 16, b"\x0d" * 16
    data = tmp_path / "edge.pb"
    data.write_bytes(frames(requests([
        span(crossing, "admin.action", until - 1_000_000, "admin"),
        span(crossing, "audit.log", until + 1_000_000, "audit"),
        span(outside, "admin.action", until + MINUTE, "admin")])))
    moment = "2025-02-01T01:00:00Z"
    whole = betrace("replay", "--rules", rules, "--until", moment, data)
    assert whole.returncode == EXIT_OK, whole.stderr
    assert whole.stdout == ""
    assert "replayed 1 traces" in whole.stderr
    cut = betrace("replay", "--rules", rules, "--until", moment, "--edge", "0s", data)
    assert [s["trace_id"] for s in signals(cut.stdout)] == [crossing.hex()]
    bad = betrace("replay", "--rules", rules, "--until", moment, "--edge", "soon", data)
    assert bad.returncode == EXIT_UNUSABLE and "invalid --edge 'soon'" in bad.stderr


def test_parse_moment() -> None:
    now = BASE_NS
    assert parse_moment("2025-02-01T00:00:00Z") == BASE_NS
    assert parse_moment("2025-02-01T01:00:00.5+01:00") == BASE_NS + 500_000_000
    assert parse_moment("2025-02-01") == BASE_NS
    assert parse_moment("29d", now) == now - 29 * 86400 * 10**9
    assert parse_moment("6h", now) == now - 6 * 3600 * 10**9
    assert parse_moment("90m", now) == now - 90 * MINUTE
    for bad in ("2025-02-01T00:00:00", "soon", "-3d", "3 days"):
        with pytest.raises(SourceError, match="invalid time"):
            parse_moment(bad)


# --- the proto reader decodes what the live path decodes ----------------------------------------


def test_proto_reader_matches_the_live_decoder(tmp_path: Path) -> None:
    """Every AnyValue kind, long strings, negative and huge ints, status with a message,
    missing parent: the replay reader's fast paths give what the live path's protobuf classes
    give."""
    odd = {"s": "x" * 300, "neg": -5, "big": 2**62, "f": -1.5, "t": True, "flag": False,
           "b": b"\x00\x01", "arr": [1, "two", 3.0], "kv": {"a": 1}, "empty": "", "zero": 0,
           "uni": "héllo ✓"}
    trace_id = bytes(range(1, 17))
    message = Span(trace_id=trace_id, span_id=b"\x01" * 8, name="odd", kind=Span.SPAN_KIND_SERVER,
                   start_time_unix_nano=BASE_NS, end_time_unix_nano=BASE_NS + 1,
                   attributes=attributes(odd), status=Status(code=2, message="boom"))
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource={"attributes": attributes({"service.name": "svc"})},
        scope_spans=[ScopeSpans(spans=[message])])])
    path = tmp_path / "odd.pb"
    path.write_bytes(frames([request]))
    ruleset = load_rules_text("rules:\n  - id: r\n    condition: trace.has(odd).where(t)\n"
                              "    signal:\n      context: [" + ", ".join(odd) + "]\n")
    keep = SpanFilter.of(ruleset.projection())
    errors: list[Any] = []
    batches = list(read_source(str(path), keep, errors))
    assert errors == []
    [[span]] = [b[trace_id.hex()] for b in batches]
    doc = MessageToDict(request)  # the same request in OTLP JSON
    [from_json] = decode_json_request(doc, keep).batch[trace_id.hex()]
    assert span == from_json
    assert span.attributes == {**odd, "arr": (1, "two", 3.0)} and span.status == "ERROR"


# --- progress and interruption ------------------------------------------------------------------


def test_progress_is_quiet_when_short_and_drawn_when_asked(
        rules: Path, tmp_path: Path, shop: tuple[list[Any], set[Any]]) -> None:
    reqs, _ = shop
    data = tmp_path / "t.pb"
    data.write_bytes(frames(reqs))
    quiet = betrace("replay", "--rules", rules, data)  # not a terminal, and under 5 s
    assert "spans/s" not in quiet.stderr
    drawn = betrace("replay", "--rules", rules, "--progress", "bar", "--jobs", "1", data)
    assert drawn.returncode == EXIT_OK
    assert re.search(r"\r\x1b\[Kbetrace: read [\d,]+ spans kept \([\d,]+ spans/s\), \d+% of "
                     r"[\d.]+ KiB, ETA \d+:\d\d", drawn.stderr)


@pytest.mark.parametrize(("jobs", "stop", "status"), [
    ("1", signal.SIGINT, 130), ("2", signal.SIGINT, 130), ("2", signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_and_removes_the_temp_directory(
        rules: Path, tmp_path: Path, jobs: str, stop: signal.Signals, status: int) -> None:
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)  # reading it blocks: the replay is mid-read when interrupted
    other = tmp_path / "other.jsonl"  # a second source, so that two processes run
    other.write_bytes(json_lines(requests(omnicart(3)[0])))
    spill = tmp_path / "spill"
    spill.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "replay", "--rules", str(rules), "--jobs", jobs,
         "--spill-dir", str(spill), str(other), str(fifo)], cwd=REPO, env=env,
        stderr=subprocess.PIPE,
        # as a terminal's Ctrl-C finds it: a shell starting the tests with `&` ignores SIGINT,
        # and its children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 20
        while not list(spill.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(spill.iterdir()), "the replay made its temp directory"
        time.sleep(0.3)  # let it block in the read
        process.send_signal(stop)
        assert process.wait(timeout=20) == status
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()
    assert list(spill.iterdir()) == []

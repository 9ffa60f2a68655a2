"""A stand-in for Tempo's HTTP query API, for tests: Tempo itself cannot be installed here.

Two parts, both modelled on Tempo's documentation, not on our client:

- `compile_traceql`: an evaluator for the subset of TraceQL that sidecar.dsl.traceql writes, with
  Tempo's documented typing (https://grafana.com/docs/tempo/latest/traceql/construct-traceql-queries/):
  no coercion between types, and no int/float comparison either (Tempo issue #4332: `{ span.f = 3 }`
  never matches a float attribute); regexes fully anchored; `=` on an array matches any element.
- `FakeTempo`: a real HTTP server on 127.0.0.1 answering GET /api/search, /api/v2/traces/<id> and
  /api/traces/<id> in the shapes of https://grafana.com/docs/tempo/latest/api_docs/ (search:
  `traces[{traceID, rootServiceName, rootTraceName, startTimeUnixNano, durationMs, spanSets}]` and
  `metrics`; v2: `{"trace": {"resourceSpans": [...]}}`; v1: `{"batches": [...]}`). Its search
  filters stored traces with the evaluator, so the query under test decides what is found.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import re2

from sidecar.model.spans import Span

SpanTest = Callable[[Span], bool]
TraceTest = Callable[[list[Span]], bool]

# --- the TraceQL subset -------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<dur>-?\d+(?:\.\d+)?(?:ns|us|ms|s|m|h)(?![A-Za-z0-9]))
  | (?P<num>-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)
  | (?P<ref>(?:span|resource)\.(?:"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_.]*))
  | (?P<op>&&|\|\||=~|!=|>=|<=|=|>|<|\{|\}|\(|\))
  | (?P<word>[A-Za-z_]+)
)""", re.VERBOSE)
_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
          "h": 3_600_000_000_000}
_ORDER = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b, ">": lambda a, b: a > b,
          ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}


@dataclass(frozen=True)
class _Typed:
    kind: str  # int, float, str, bool, duration, status, kind
    value: Any


def _unquote(token: str) -> str:
    """Go's strconv.Unquote for the escapes our writer emits: \\\\ \\" \\xNN."""
    return re.sub(r"\\(x[0-9a-fA-F]{2}|.)",
                  lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1)[0] == "x" and
                  len(m.group(1)) == 3 else m.group(1), token[1:-1])


def _attr_name(token: str) -> str:
    """Quoted attribute names know only \\" and \\\\."""
    if token.startswith('"'):
        return re.sub(r'\\(["\\])', r"\1", token[1:-1])
    return token


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        position, text = 0, text.rstrip()
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None or match.end() == position:
                raise ValueError(f"cannot lex TraceQL at {position}: {text[position:]!r}")
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.at = 0

    def peek(self) -> str:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else ""

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.at >= len(self.tokens):
            raise ValueError("unexpected end of TraceQL")
        token = self.tokens[self.at]
        if expected is not None and token[1] != expected:
            raise ValueError(f"expected {expected!r}, got {token[1]!r}")
        self.at += 1
        return token

    def trace_or(self) -> TraceTest:
        parts = [self.trace_and()]
        while self.peek() == "||":
            self.take()
            parts.append(self.trace_and())
        return lambda spans: any(p(spans) for p in parts)

    def trace_and(self) -> TraceTest:
        parts = [self.trace_atom()]
        while self.peek() == "&&":
            self.take()
            parts.append(self.trace_atom())
        return lambda spans: all(p(spans) for p in parts)

    def trace_atom(self) -> TraceTest:
        if self.peek() == "(":
            self.take()
            inner = self.trace_or()
            self.take(")")
            return inner
        self.take("{")
        if self.peek() == "}":
            self.take()
            return lambda spans: bool(spans)
        test = self.span_or()
        self.take("}")
        return lambda spans: any(test(s) for s in spans)

    def span_or(self) -> SpanTest:
        parts = [self.span_and()]
        while self.peek() == "||":
            self.take()
            parts.append(self.span_and())
        return lambda s: any(p(s) for p in parts)

    def span_and(self) -> SpanTest:
        parts = [self.span_atom()]
        while self.peek() == "&&":
            self.take()
            parts.append(self.span_atom())
        return lambda s: all(p(s) for p in parts)

    def span_atom(self) -> SpanTest:
        if self.peek() == "(":
            self.take()
            inner = self.span_or()
            self.take(")")
            return inner
        kind, text = self.take()
        field_of = self.field(kind, text)
        _, op = self.take()
        literal = self.literal(*self.take())
        return lambda s: _compare(field_of(s), op, literal)

    @staticmethod
    def field(kind: str, text: str) -> Callable[[Span], list[_Typed]]:
        if kind == "ref":
            scope, _, name = text.partition(".")
            name = _attr_name(name)
            if scope == "resource":
                return lambda s: [_Typed("str", s.service)] if name == "service.name" \
                    and s.service is not None else []
            return lambda s: _typed(s.attributes.get(name))
        intrinsics: dict[str, Callable[[Span], list[_Typed]]] = {
            "name": lambda s: [_Typed("str", s.name)],
            "status": lambda s: [_Typed("status", s.status.lower())],
            "kind": lambda s: [_Typed("kind", s.kind.lower())],
            "duration": lambda s: [_Typed("duration", s.end_ns - s.start_ns)],
        }
        if text not in intrinsics:
            raise ValueError(f"unsupported field {text!r}")
        return intrinsics[text]

    @staticmethod
    def literal(kind: str, text: str) -> _Typed:
        if kind == "str":
            return _Typed("str", _unquote(text))
        if kind == "dur":
            number, unit = re.fullmatch(r"(-?[\d.]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
            return _Typed("duration", int(float(number) * _UNITS[unit]))
        if kind == "num":
            return _Typed("float", float(text)) if re.search(r"[.e]", text) \
                else _Typed("int", int(text))
        if text in ("true", "false"):
            return _Typed("bool", text == "true")
        if text in ("ok", "error", "unset"):
            return _Typed("status", text)
        if text in ("server", "client", "producer", "consumer", "internal", "unspecified"):
            return _Typed("kind", text)
        raise ValueError(f"unsupported literal {text!r}")


def _typed(value: Any) -> list[_Typed]:
    """An attribute's values as Tempo stores them; an array contributes each element."""
    if value is None:
        return []
    if isinstance(value, tuple):
        return [t for item in value for t in _typed(item)]
    if isinstance(value, bool):
        return [_Typed("bool", value)]
    if isinstance(value, int):
        return [_Typed("int", value)]
    if isinstance(value, float):
        return [_Typed("float", value)]
    if isinstance(value, str):
        return [_Typed("str", value)]
    return []  # kvlists and bytes: nothing a literal can match


def _compare(values: list[_Typed], op: str, literal: _Typed) -> bool:
    for value in values:
        if value.kind != literal.kind:
            continue  # never coerced, not even int against float
        if op == "=~":
            found = re2.compile(literal.value).fullmatch(value.value) is not None
        else:  # enums and booleans have no order
            found = (op in ("=", "!=") or value.kind in ("int", "float", "str", "duration")) \
                and _ORDER[op](value.value, literal.value)
        if found:
            return True
    return False


def compile_traceql(text: str) -> TraceTest:
    """A test over a trace's spans: does the TraceQL query match the trace?"""
    parser = _Parser(text)
    test = parser.trace_or()
    if parser.at != len(parser.tokens):
        raise ValueError(f"trailing TraceQL: {parser.tokens[parser.at:]}")
    return test


# --- OTLP JSON as Tempo writes it ---------------------------------------------------------------

def any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, tuple):
        return {"arrayValue": {"values": [any_value(v) for v in value]}}
    return {"stringValue": str(value)}


def otlp_trace(spans: list[Span], *, base64_ids: bool, key: str = "resourceSpans",
               resource: dict[str, Any] | None = None) -> dict[str, Any]:
    """One trace as an OTLP JSON request; Tempo's JSON writes ids in base64 and enums by name."""
    def encode(hex_id: str) -> str:
        return base64.b64encode(bytes.fromhex(hex_id)).decode() if base64_ids else hex_id

    by_service: dict[tuple[str | None, str | None], list[dict[str, Any]]] = {}
    for s in spans:
        raw: dict[str, Any] = {
            "traceId": encode(s.trace_id), "spanId": encode(s.span_id), "name": s.name,
            "kind": f"SPAN_KIND_{s.kind}", "startTimeUnixNano": str(s.start_ns),
            "endTimeUnixNano": str(s.end_ns),
            "attributes": [{"key": k, "value": any_value(v)} for k, v in s.attributes.items()],
            "status": {"code": f"STATUS_CODE_{s.status}"} if s.status != "UNSET" else {},
        }
        if s.parent_span_id:
            raw["parentSpanId"] = encode(s.parent_span_id)
        by_service.setdefault((s.service, s.version), []).append(raw)
    extra = [{"key": k, "value": any_value(v)} for k, v in (resource or {}).items()]
    return {key: [
        {"resource": {"attributes": extra + [
            {"key": name, "value": {"stringValue": value}}
            for name, value in (("service.name", service), ("service.version", version))
            if value is not None]},
         "scopeSpans": [{"scope": {"name": "betrace-tests"}, "spans": group}]}
        for (service, version), group in by_service.items()]}


# --- the server ---------------------------------------------------------------------------------

@dataclass
class StoredTrace:
    spans: list[Span]
    base64_ids: bool = False
    resource: dict[str, Any] | None = None  # more resource attributes than service.name

    @property
    def start_s(self) -> int:
        return min(s.start_ns for s in self.spans) // 1_000_000_000

    @property
    def end_s(self) -> int:
        return max(s.end_ns for s in self.spans) // 1_000_000_000


@dataclass
class Request:
    path: str
    params: dict[str, str]
    headers: dict[str, str]  # names in lower case


@dataclass
class FakeTempo:
    traces: dict[str, StoredTrace] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    v2: bool = True  # False: an older Tempo without /api/v2/traces (and `batches` on v1)
    expired: set[str] = field(default_factory=set)  # found by search, 404 on fetch
    fail: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)  # path ->
    delays: dict[str, list[float]] = field(default_factory=dict)  # path -> seconds, per request
    raw: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)  # path -> answer
    server_limit: int | None = None  # a max_result_limit below the client's limit
    max_duration_s: int | None = None  # refuse longer searches, as Tempo's max_duration does
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, spans: list[Span], *, base64_ids: bool = False,
            resource: dict[str, Any] | None = None) -> str:
        trace_id = spans[0].trace_id
        self.traces[trace_id] = StoredTrace(spans, base64_ids, resource)
        return trace_id

    def paths(self, prefix: str = "") -> list[str]:
        return [r.path for r in self.requests if r.path.startswith(prefix)]

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, str, bytes, dict[str, str]]:
        with self.lock:
            failures = self.fail.get(path)
            if failures:
                status, headers = failures.pop(0)
                return status, "text/plain", b"upstream unavailable", headers
            if path in self.raw:
                return (*self.raw[path], {})
        if path == "/api/search":
            return self.search(params)
        for prefix, version in (("/api/v2/traces/", 2), ("/api/traces/", 1)):
            if path.startswith(prefix):
                return self.trace(path[len(prefix):], version)
        return 404, "text/plain", b"404 page not found\n", {}

    def search(self, params: dict[str, str]) -> tuple[int, str, bytes, dict[str, str]]:
        start, end, limit = int(params["start"]), int(params["end"]), int(params["limit"])
        if self.max_duration_s is not None and end - start > self.max_duration_s:
            body = (f"range specified by start and end exceeds {self.max_duration_s}s. received "
                    f"start={start} end={end}").encode()
            return 400, "text/plain", body, {}
        test = compile_traceql(params["q"])
        found = [(trace_id, stored) for trace_id, stored in self.traces.items()
                 if stored.start_s <= end and stored.end_s >= start and test(stored.spans)]
        # Tempo returns the first traces its jobs find, in no particular order
        found.sort(key=lambda item: item[0][::-1])
        cap = min(limit, self.server_limit or limit)
        jobs = 5
        done = jobs if len(found) <= cap else 2
        traces = [_search_entry(trace_id, stored) for trace_id, stored in found[:cap]]
        metrics = {"inspectedTraces": len(self.traces), "inspectedBytes": "3811736",
                   "totalBlocks": 3}
        if self.server_limit is not None:
            metrics.update(totalJobs=jobs, completedJobs=done)
        return 200, "application/json", json.dumps({"traces": traces, "metrics": metrics}).encode(), {}

    def trace(self, trace_id: str, version: int) -> tuple[int, str, bytes, dict[str, str]]:
        stored = self.traces.get(trace_id)
        if version == 2 and not self.v2:
            return 404, "text/plain", b"404 page not found\n", {}
        if stored is None or trace_id in self.expired:
            return 404, "text/plain", b"trace not found\n", {}
        body = otlp_trace(stored.spans, base64_ids=stored.base64_ids, resource=stored.resource,
                          key="resourceSpans" if version == 2 else "batches")
        doc = {"trace": body} if version == 2 else body
        return 200, "application/json", json.dumps(doc).encode(), {}


def _search_entry(trace_id: str, stored: StoredTrace) -> dict[str, Any]:
    root = min(stored.spans, key=lambda s: s.start_ns)
    start = root.start_ns
    end = max(s.end_ns for s in stored.spans)
    return {
        "traceID": trace_id.lstrip("0"),  # Tempo drops leading zeros here
        "rootServiceName": root.service or "<root span not yet received>",
        "rootTraceName": root.name,
        "startTimeUnixNano": str(start),
        "durationMs": (end - start) // 1_000_000,
        "spanSets": [{"spans": [{"spanID": root.span_id, "startTimeUnixNano": str(start),
                                 "durationNanos": str(root.end_ns - root.start_ns),
                                 "attributes": []}],
                      "matched": 1}],
    }


class _Handler(BaseHTTPRequestHandler):
    fake: FakeTempo

    def do_GET(self) -> None:
        try:
            url = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(url.query))
            fake = self.server.fake  # type: ignore[attr-defined]
            with fake.lock:
                fake.requests.append(Request(url.path, params,
                                             {k.lower(): v for k, v in self.headers.items()}))
                delays = fake.delays.get(url.path)
                delay = delays.pop(0) if delays else 0.0
            if delay:
                time.sleep(delay)
            status, content_type, body, headers = fake.answer(url.path, params)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up mid-answer is expected in timeout tests


def serve(fake: FakeTempo) -> Iterator[str]:
    """Run `fake` on a loopback port; yields its base URL, stops it afterwards."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

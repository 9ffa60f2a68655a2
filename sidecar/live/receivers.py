"""Ingest: the OTLP receivers. gRPC `TraceService/Export` and OTLP/HTTP `POST /v1/traces`
(protobuf or JSON, gzip or not) both end in `Intake.export`.

Answers follow OTLP: an undecodable request is INVALID_ARGUMENT (HTTP 400) and the server
carries on; spans refused for limits or invalid ids are reported in `partial_success`; a store
that cannot take the spans (Redis down) is UNAVAILABLE (HTTP 503), so the collector retries and
nothing acknowledged is lost.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import zlib
from concurrent import futures
from http.server import ThreadingHTTPServer
from typing import Any

import grpc
import orjson
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from sidecar.live.assembler import Assembler
from sidecar.live.metrics import Metrics, QuietHandler
from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import Projection
from sidecar.otlp.json_spans import spans_from_request
from sidecar.otlp.protobuf import Decoded, decode_request, parse_request

log = logging.getLogger(__name__)

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # collector batches can be large; bounded all the same


class StoreUnavailable(Exception):
    """The trace store cannot accept spans right now; the sender should retry."""


class InvalidRequest(ValueError):
    """The request body is not an OTLP trace export."""


class Intake:
    """Decode, prune, hand to the assembler, and say what was refused."""

    def __init__(self, assembler: Assembler, metrics: Metrics) -> None:
        self.assembler = assembler
        self.metrics = metrics

    def export_protobuf(self, body: bytes, transport: str) -> ExportTraceServiceResponse:
        try:
            request = parse_request(body)
        except ValueError as exc:
            self.metrics.requests_rejected.labels(transport=transport, reason="invalid").inc()
            raise InvalidRequest(str(exc)) from None
        return self._accept(decode_request(request, self.assembler.projection), transport)

    def export_json(self, body: bytes, transport: str) -> ExportTraceServiceResponse:
        projection = self.assembler.projection
        wants = projection.wants_name
        # Our own violation spans must come through the projection to be counted as such
        # (as the protobuf path does), not as spans no rule selects.
        own_too = Projection(lambda name: name == VIOLATION_SPAN or wants(name),
                             projection.attributes)
        try:
            doc = orjson.loads(body)
            invalid: list[str] = []
            spans = spans_from_request(doc, own_too, invalid)
        except (ValueError, orjson.JSONDecodeError) as exc:
            self.metrics.requests_rejected.labels(transport=transport, reason="invalid").inc()
            raise InvalidRequest(f"not an OTLP JSON ExportTraceServiceRequest: {exc}") from None
        decoded = Decoded(received=_count_json_spans(doc), invalid=invalid)
        for span in spans:
            if span.name == VIOLATION_SPAN:
                decoded.own += 1
            else:
                decoded.batch.setdefault(span.trace_id, []).append(span)
        decoded.not_selected = decoded.received - len(spans) - len(invalid)
        return self._accept(decoded, transport)

    def _accept(self, decoded: Decoded, transport: str) -> ExportTraceServiceResponse:
        metrics = self.metrics
        metrics.spans_received.labels(transport=transport).inc(decoded.received)
        if decoded.not_selected:
            metrics.spans_dropped.labels(reason="not_selected").inc(decoded.not_selected)
        if decoded.own:
            metrics.spans_dropped.labels(reason="own_violation").inc(decoded.own)
        rejected, messages = len(decoded.invalid), list(decoded.invalid[:3])
        if rejected:
            metrics.spans_rejected.labels(reason="invalid").inc(rejected)
        if decoded.batch:
            try:
                result = self.assembler.ingest(decoded.batch)
            except Exception as exc:
                metrics.store_errors.labels(operation="append").inc()
                metrics.requests_rejected.labels(transport=transport, reason="unavailable").inc()
                raise StoreUnavailable(f"trace store unavailable: {exc}") from exc
            if result.rejected:
                rejected += result.rejected
                messages.append(f"{result.rejected} span(s) over max_spans_per_trace")
        if not rejected:
            return ExportTraceServiceResponse()
        return ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
            rejected_spans=rejected, error_message="; ".join(messages)))


def _count_json_spans(doc: Any) -> int:
    total = 0
    for resource_spans in doc.get("resourceSpans") or doc.get("batches") or ():
        for scope_spans in (resource_spans.get("scopeSpans")
                            or resource_spans.get("instrumentationLibrarySpans") or ()):
            total += len(scope_spans.get("spans") or ())
    return total


# --- gRPC ---------------------------------------------------------------------------------------

def grpc_server(intake: Intake, listen: str, workers: int = 8) -> tuple[grpc.Server, int]:
    """An OTLP gRPC server (with the standard health service); returns it and its bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-grpc"),
        # No SO_REUSEPORT (gRPC's default on Linux): a second sidecar on the same port would
        # silently take half of the traffic, splitting traces between two memory stores.
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)])

    def export(body: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        try:
            return intake.export_protobuf(body, "grpc")
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("abort raises")

    # Raw bytes in, so an undecodable body is our INVALID_ARGUMENT rather than gRPC's INTERNAL.
    handler = grpc.method_handlers_generic_handler(TRACE_SERVICE, {
        "Export": grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=None,
            response_serializer=ExportTraceServiceResponse.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(TRACE_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:  # what grpcio raises when it cannot bind (older versions return 0)
        port = 0
    if port == 0:
        raise OSError(f"cannot listen for OTLP gRPC on {listen}: address in use or not "
                      "available")
    return server, port


# --- OTLP/HTTP ----------------------------------------------------------------------------------

MAX_HTTP_BODY = MAX_MESSAGE_BYTES
_PROTOBUF, _JSON = "application/x-protobuf", "application/json"


class _OtlpHttpHandler(QuietHandler):
    server: OtlpHttpServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] != "/v1/traces":
            return self._status(404, code_pb2.NOT_FOUND, "only POST /v1/traces is served here")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type not in (_PROTOBUF, _JSON):
            return self._status(415, code_pb2.INVALID_ARGUMENT,
                                f"Content-Type must be {_PROTOBUF} or {_JSON}")
        try:
            body = self._body()
        except ValueError as exc:
            return self._status(400, code_pb2.INVALID_ARGUMENT, str(exc), content_type)
        intake = self.server.intake
        try:
            response = intake.export_protobuf(body, "http") if content_type == _PROTOBUF \
                else intake.export_json(body, "http")
        except InvalidRequest as exc:
            return self._status(400, code_pb2.INVALID_ARGUMENT, str(exc), content_type)
        except StoreUnavailable as exc:
            return self._status(503, code_pb2.UNAVAILABLE, str(exc), content_type,
                                {"Retry-After": "1"})
        self._send_message(200, content_type, response)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_HTTP_BODY:
            raise ValueError(f"body of {length} bytes exceeds {MAX_HTTP_BODY}")
        body = self.rfile.read(length)
        encoding = (self.headers.get("Content-Encoding") or "identity").lower()
        try:
            if encoding == "gzip":
                return gzip.decompress(body)
            if encoding == "deflate":
                return zlib.decompress(body)
        except (OSError, zlib.error, EOFError) as exc:
            raise ValueError(f"cannot decompress {encoding} body: {exc}") from None
        if encoding != "identity":
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")
        return body

    def _status(self, http_status: int, code: int, message: str,
                content_type: str = _PROTOBUF, headers: dict[str, str] | None = None) -> None:
        self._send_message(http_status, content_type,
                           status_pb2.Status(code=code, message=message), headers)

    def _send_message(self, http_status: int, content_type: str, message: Any,
                      headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(json_format.MessageToDict(message)).encode()
                if content_type == _JSON else message.SerializeToString())
        self._send(http_status, content_type, body, headers)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("otlp-http: " + format, *args)


class OtlpHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, intake: Intake, address: tuple[str, int]) -> None:
        super().__init__(address, _OtlpHttpHandler)
        self.intake = intake

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="otlp-http", daemon=True)
        thread.start()
        return thread

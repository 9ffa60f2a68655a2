"""Ingest: the OTLP receivers. gRPC `TraceService/Export` and OTLP/HTTP `POST /v1/traces`
(protobuf or JSON, gzip or not) both end in `Intake.export`.

Answers follow OTLP: an undecodable request is INVALID_ARGUMENT (HTTP 400) and the server
carries on; spans refused for limits or invalid ids are reported in `partial_success`; a store
that cannot take the spans (Redis down) is UNAVAILABLE (HTTP 503), so the collector retries and
nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
from concurrent import futures
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from sidecar.live.assembler import ActiveRules, Assembler
from sidecar.live.credentials import BearerToken
from sidecar.live.http_server import HTTP_TIMEOUT, BodyError, HttpServer, read_body
from sidecar.live.metrics import Metrics
from sidecar.model.errors import StoreBusy, StoreUnavailable
from sidecar.otlp.decoded import Decoded
from sidecar.otlp.json_spans import decode_json

log = logging.getLogger(__name__)

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # collector batches can be large; bounded all the same


class InvalidRequest(ValueError):
    """The request body is not an OTLP trace export."""


class InternalError(Exception):
    """Accepting the request failed on a bug (not a store that is down): answered INTERNAL, which
    OTLP senders do not retry, so a bug is loud instead of a retry loop."""


class Intake:
    """Decode, prune, hand to the assembler, and say what was refused. With a `token`, only
    senders that present it are heard."""

    def __init__(self, assembler: Assembler, metrics: Metrics,
                 token: BearerToken | None = None) -> None:
        self.assembler = assembler
        self.metrics = metrics
        self.token = token

    def authorized(self, authorization: str | None, transport: str) -> bool:
        """Whether a request with this Authorization header (or gRPC metadata) may export."""
        if self.token is None or self.token.allows(authorization):
            return True
        self.metrics.requests_rejected.labels(transport=transport,
                                              reason="unauthenticated").inc()
        return False

    def export_protobuf(self, body: bytes, transport: str) -> ExportTraceServiceResponse:
        active = self.assembler.active  # one snapshot decodes and judges the request
        try:
            decoded = active.decoder.decode(body)
        except ValueError as exc:
            self.metrics.requests_rejected.labels(transport=transport, reason="invalid").inc()
            raise InvalidRequest(str(exc)) from None
        except Exception as exc:
            raise self._internal(exc, transport, "decoding") from exc
        return self._accept(decoded, active, transport)

    def export_json(self, body: bytes, transport: str) -> ExportTraceServiceResponse:
        active = self.assembler.active
        try:
            decoded = decode_json(body, active.keep)
        except ValueError as exc:  # orjson.JSONDecodeError among them
            self.metrics.requests_rejected.labels(transport=transport, reason="invalid").inc()
            raise InvalidRequest(f"not an OTLP JSON ExportTraceServiceRequest: {exc}") from None
        except Exception as exc:
            raise self._internal(exc, transport, "decoding") from exc
        return self._accept(decoded, active, transport)

    def _count(self, decoded: Decoded, transport: str) -> int:
        """Count a request's spans as received, dropped and invalid; returns the invalid."""
        metrics = self.metrics
        metrics.spans_received.labels(transport=transport).inc(decoded.received)
        if decoded.not_selected:
            metrics.spans_dropped.labels(reason="not_selected").inc(decoded.not_selected)
        if decoded.own:
            metrics.spans_dropped.labels(reason="own_violation").inc(decoded.own)
        if decoded.invalid:
            metrics.spans_rejected.labels(reason="invalid").inc(len(decoded.invalid))
        return len(decoded.invalid)

    def _internal(self, exc: Exception, transport: str, stage: str) -> InternalError:
        """A bug met while `stage`: logged with its stack, counted, answered INTERNAL."""
        self.metrics.requests_rejected.labels(transport=transport, reason="internal").inc()
        log.error("export request refused: internal error while %s (a bug; the sender is "
                  "answered INTERNAL and does not retry)", stage, exc_info=exc)
        return InternalError(f"internal error: {type(exc).__name__}: {exc}")

    def _accept(self, decoded: Decoded, active: ActiveRules,
                transport: str) -> ExportTraceServiceResponse:
        """Store, then count: a request refused as unavailable is retried by its sender, and
        its spans are counted once, when they are taken."""
        metrics = self.metrics
        result = None
        if decoded.batch or decoded.bare_trace_ids:
            try:
                result = self.assembler.ingest(decoded.batch, active, decoded.bare_trace_ids)
            except StoreBusy:
                metrics.requests_rejected.labels(transport=transport, reason="busy").inc()
                raise
            except StoreUnavailable:
                metrics.store_errors.labels(operation="append").inc()
                metrics.requests_rejected.labels(transport=transport, reason="unavailable").inc()
                raise
            except Exception as exc:
                self._count(decoded, transport)
                metrics.spans_rejected.labels(reason="internal").inc(
                    sum(map(len, decoded.batch.values())))
                raise self._internal(exc, transport, "storing the spans") from exc
        rejected, messages = self._count(decoded, transport), list(decoded.invalid[:3])
        if result is not None:
            if result.rejected:
                rejected += result.rejected
                messages.append(f"{result.rejected} span(s) over max_spans_per_trace")
            if result.rejected_bytes:
                rejected += result.rejected_bytes
                messages.append(f"{result.rejected_bytes} span(s) over max_trace_bytes")
        if not rejected:
            return ExportTraceServiceResponse()
        return ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
            rejected_spans=rejected, error_message="; ".join(messages)))


# --- gRPC ---------------------------------------------------------------------------------------

def grpc_server(intake: Intake, listen: str, workers: int = 8,
                credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """An OTLP gRPC server (with the standard health service, which asks for no token);
    returns it and its bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-grpc"),
        # No SO_REUSEPORT (gRPC's default on Linux): a second sidecar on the same port would
        # silently take half of the traffic, splitting traces between two memory stores.
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)])

    def export(body: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        if intake.token is not None and not intake.authorized(
                dict(context.invocation_metadata()).get("authorization"), "grpc"):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            return intake.export_protobuf(body, "grpc")
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"trace store unavailable: {exc}")
        except InternalError as exc:
            context.abort(grpc.StatusCode.INTERNAL, str(exc))
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
        port = (server.add_secure_port(listen, credentials) if credentials is not None
                else server.add_insecure_port(listen))
    except RuntimeError:  # what grpcio raises when it cannot bind (older versions return 0)
        port = 0
    if port == 0:
        raise OSError(f"cannot listen for OTLP gRPC on {listen}: address in use or not "
                      "available")
    return server, port


# --- OTLP/HTTP ----------------------------------------------------------------------------------

MAX_HTTP_BODY = MAX_MESSAGE_BYTES  # before and after decompression
_PROTOBUF, _JSON = "application/x-protobuf", "application/json"


class OtlpHttp:
    """OTLP/HTTP `POST /v1/traces`, protobuf or JSON, gzip or deflate or neither, chunked or
    not. The intake runs on a small pool of threads (it may wait for Redis), never on the
    event loop. `drain` ends the intake for shutdown: anything that comes after the final
    decision pass began is answered 503, never acknowledged and then lost."""

    def __init__(self, intake: Intake, address: tuple[str, int],
                 timeout: float = HTTP_TIMEOUT, workers: int = 4,
                 tls: ssl.SSLContext | None = None) -> None:
        self.intake = intake
        self.timeout = timeout
        self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="otlp-http")
        self._draining = False
        self._in_flight = 0  # requests accepted for reading, not yet answered (loop thread only)
        self.server = HttpServer(self._handle, address, "otlp-http", timeout, tls=tls)
        self.port = self.server.port

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.path != "/v1/traces":
            return _status(404, code_pb2.NOT_FOUND, "only POST /v1/traces is served here")
        if request.method != "POST":
            return _status(405, code_pb2.INVALID_ARGUMENT, "only POST /v1/traces is served here",
                           headers={"Allow": "POST"})
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in (_PROTOBUF, _JSON):
            return _status(415, code_pb2.INVALID_ARGUMENT,
                           f"Content-Type must be {_PROTOBUF} or {_JSON}")
        if not self.intake.authorized(request.headers.get("Authorization"), "http"):
            return _status(401, code_pb2.UNAUTHENTICATED, "missing or wrong bearer token",
                           content_type, {"WWW-Authenticate": 'Bearer realm="otlp"',
                                          "Connection": "close"})
        if self._draining:
            return _status(503, code_pb2.UNAVAILABLE, "shutting down: send to another sidecar",
                           content_type, {"Retry-After": "1", "Connection": "close"})
        self._in_flight += 1
        try:
            return await self._export(request, content_type)
        finally:
            self._in_flight -= 1

    async def _export(self, request: web.BaseRequest, content_type: str) -> web.Response:
        intake = self.intake
        try:
            body = await read_body(request, MAX_HTTP_BODY, self.timeout)
        except BodyError as exc:
            intake.metrics.requests_rejected.labels(
                transport="http", reason="too_large" if exc.status == 413 else "invalid").inc()
            return _status(exc.status, code_pb2.INVALID_ARGUMENT, str(exc), content_type,
                           {"Connection": "close"} if exc.status in (408, 413) else None)
        export = intake.export_protobuf if content_type == _PROTOBUF else intake.export_json
        try:
            response = await asyncio.get_running_loop().run_in_executor(
                self._pool, export, body, "http")
        except InvalidRequest as exc:
            return _status(400, code_pb2.INVALID_ARGUMENT, str(exc), content_type)
        except StoreUnavailable as exc:
            return _status(503, code_pb2.UNAVAILABLE, f"trace store unavailable: {exc}",
                           content_type, {"Retry-After": "1"})
        except InternalError as exc:
            return _status(500, code_pb2.INTERNAL, str(exc), content_type)
        return _message(200, content_type, response)

    def start(self) -> threading.Thread:
        return self.server.start()

    def drain(self, timeout: float) -> None:
        """Stop accepting connections, answer 503 from now on, and wait (at most `timeout`)
        for the requests already being read or stored."""
        self.server.stop_accepting(timeout)

        async def settle() -> None:
            self._draining = True
            while self._in_flight:
                await asyncio.sleep(0.01)

        try:
            self.server.call(settle(), timeout)
        except futures.TimeoutError:
            log.warning("OTLP/HTTP: %d request(s) still in flight after %gs", self._in_flight,
                        timeout)

    def close(self) -> None:
        self.server.close()
        self._pool.shutdown(wait=True)


def _status(http_status: int, code: int, message: str, content_type: str = _PROTOBUF,
            headers: dict[str, str] | None = None) -> web.Response:
    return _message(http_status, content_type, status_pb2.Status(code=code, message=message),
                    headers)


def _message(http_status: int, content_type: str, message: Any,
             headers: dict[str, str] | None = None) -> web.Response:
    body = (json.dumps(json_format.MessageToDict(message)).encode()
            if content_type == _JSON else message.SerializeToString())
    return web.Response(status=http_status, body=body,
                        headers={"Content-Type": content_type, **(headers or {})})

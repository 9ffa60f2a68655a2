"""Shared fixtures for the tests that run real parts: a real OTLP gRPC receiver (where the
sidecar sends its violation spans), real OpenTelemetry SDK tracers exporting to the sidecar, free
loopback ports, bounded polling and Prometheus scraping.

Everything here starts real servers on 127.0.0.1 and tears them down at the end of the test.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Tracer, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


# --- free ports and polling -----------------------------------------------------------------

@pytest.fixture
def free_port() -> Callable[[], int]:
    """processes.free_port: a loopback TCP port that was free a moment ago."""
    from processes import free_port

    return free_port


def _wait_until(condition: Callable[[], T], timeout: float = 5.0, interval: float = 0.02,
                what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    """`wait_until(fn, timeout=5, what="...")`: poll `fn` until it returns something truthy and
    return that; fail the test with `what` after `timeout` seconds."""
    return _wait_until


# --- Prometheus -------------------------------------------------------------------------------

class Scrape:
    """One /metrics scrape, parsed with prometheus_client's own text parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [sample for family in text_string_to_metric_families(text)
                        for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def has(self, name: str, **labels: str) -> bool:
        return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
                   for s in self.samples)


@pytest.fixture
def scrape() -> Callable[[int], Scrape]:
    """`scrape(port)`: GET http://127.0.0.1:port/metrics and parse it."""

    def get(port: int) -> Scrape:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            return Scrape(response.read().decode())

    return get


# --- a real OTLP gRPC receiver ----------------------------------------------------------------

class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A TraceService that keeps every ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, name: str | None = None) -> list[tuple[trace_pb2.ResourceSpans,
                                                             trace_pb2.Span]]:
        """(resource spans, span) for every span received, optionally only those named `name`."""
        with self._lock:
            requests = list(self.requests)
        return [(rs, span) for request in requests for rs in request.resource_spans
                for ss in rs.scope_spans for span in ss.spans
                if name is None or span.name == name]


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A real grpc.server on a free loopback port serving OTLP TraceService/Export."""
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4,
                                                    thread_name_prefix="test-receiver"))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None).wait(5)


# --- the real OpenTelemetry SDK as the client ---------------------------------------------------

class SdkClient:
    """A real TracerProvider exporting over OTLP gRPC; `tracer` makes spans."""

    def __init__(self, port: int, service: str, batch: bool, batch_options: dict[str, Any],
                 version: str | None = None):
        self.provider = TracerProvider(resource=Resource.create(
            {"service.name": service, **({"service.version": version} if version else {})}))
        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=5)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, **batch_options) if batch
                                         else SimpleSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("betrace-tests")

    def flush(self, timeout: float = 10.0) -> None:
        assert self.provider.force_flush(timeout_millis=int(timeout * 1000)), "SDK flush timed out"


@pytest.fixture
def sdk_client() -> Iterator[Callable[..., SdkClient]]:
    """`sdk_client(port, service="checkout", batch=False, version=None, **batch_options)`: a
    real SDK client exporting to 127.0.0.1:port with the OTLP gRPC exporter (`version` sets the
    resource's service.version). With the default SimpleSpanProcessor every span is exported,
    and acknowledged, when it ends. Every provider is shut down at the end of the test."""
    clients: list[SdkClient] = []

    def make(port: int, service: str = "checkout", batch: bool = False,
             version: str | None = None, **batch_options: Any) -> SdkClient:
        client = SdkClient(port, service, batch, batch_options, version)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.provider.shutdown()


# --- Redis ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """One real redis-server for the session (tests flush it as they need)."""
    from redis_servers import RedisServer

    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., Any]]:
    """`redis_factory(*extra_args, port=None)`: a fresh, started redis-server on loopback;
    every one is stopped and its directory removed at the end of the test."""
    from redis_servers import RedisServer

    made: list[RedisServer] = []

    def make(*extra: str, port: int | None = None, start: bool = True) -> Any:
        server = RedisServer(port, *extra)
        made.append(server)
        return server.start() if start else server

    try:
        yield make
    finally:
        for server in made:
            server.cleanup()


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    return str(redis_server.url)


# --- the signal database ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One real PostgreSQL server for the session (postgres_servers.py); each test that needs
    a database gets a fresh one from `signal_db_url`."""
    from postgres_servers import PostgresServer

    server = PostgresServer().start()
    yield server
    server.cleanup()


_databases = iter(range(1, 1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def signal_db_url(request: pytest.FixtureRequest, tmp_path: Any,
                  monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty signal database URL, once SQLite and once a real PostgreSQL (its
    password in PGPASSWORD, as libpq reads it; the URL holds none)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/signals.db"
    from postgres_servers import PASSWORD

    server = request.getfixturevalue("postgres_server")
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    return str(server.create_database(f"signals_{next(_databases)}"))

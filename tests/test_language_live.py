"""The rule language's second edition (DESIGN.md rules 16-20) live: a real sidecar fed by the
real OpenTelemetry SDK exporter, with the memory store and with Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_serve_e2e import Running, hex_trace, start_sidecar  # noqa: F401 (a fixture)

ROOT_QUERY = """
rules:
  - id: root-db-query
    severity: high
    condition: db.query.where(not parent_span_id matches ".")
"""


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    return "memory" if request.param == "memory" else request.getfixturevalue("redis_url")


def test_intrinsic_ids_come_from_the_exporter(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any], store: str) -> None:
    """Rule 19: a db.query with no parent (a root, as a background job emits it) fires; one
    under a request span does not."""
    running = start_sidecar(ROOT_QUERY, store=store)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    with tracer.start_as_current_span("db.query") as lone:
        pass
    with tracer.start_as_current_span("GET /orders"):
        with tracer.start_as_current_span("db.query"):
            pass
    [signal] = wait_until(lambda: running.signals("root-db-query"), what="the root db.query")
    assert signal["trace_id"] == hex_trace(lone)
    running.sidecar.stop()
    assert [s["trace_id"] for s in running.signals("root-db-query")] == [hex_trace(lone)]

"""The one evaluation core, on the paths that used to disagree: every test here failed on the
flat layout (before the stage packages) and names the wrong result it guards against.

- absence: a rule true on a trace without its spans fires on such traces, live (memory and
  Redis) and in replay;
- transport skew: the same spans over gRPC, OTLP/HTTP protobuf and OTLP/HTTP JSON give the same
  signals, context included;
- reload skew: spans stored under the old rules' projection never make a new rule fire;
- rule failure: a rule that raises is counted and reported, live and in replay, and every other
  rule still runs;
- a store bug is answered INTERNAL (not retried), a store that is down UNAVAILABLE.

Real parts only: the Sidecar on loopback ports fed by the OpenTelemetry SDK exporter or a gRPC /
HTTP client, a real redis-server, the `betrace` command for replay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from prometheus_client import CollectorRegistry
from test_cli import otlp_line, otlp_span
from test_serve_e2e import Running, pb_request, post, start_sidecar  # noqa: F401 (fixture)

from sidecar.live.assembler import Assembler
from sidecar.live.exporters import Emitter
from sidecar.live.metrics import Metrics
from sidecar.model.errors import IncompatibleStore
from sidecar.rules import Violation, load_rules_text
from sidecar.stores import StoreLimits
from sidecar.stores.memory import MemoryStore
from sidecar.stores.redis import RedisStore

ABSENCE_RULES = """
rules:
  - id: no-auth-check
    condition: trace.count(auth.check) == 0
  - id: no-health-check
    condition: not health.check
  - id: flag-or-experiment
    condition: not feature.flag_check or experiment.assign
  - id: charged-twice
    condition: count(payment.charge) > 1
"""
ABSENT = {"no-auth-check", "no-health-check", "flag-or-experiment"}


def _send_http_server_request(tracer: Any) -> str:
    """A trace of one `http.server.request` span: none of the spans the rules name."""
    with tracer.start_as_current_span("http.server.request") as span:
        pass
    return f"{span.get_span_context().trace_id:032x}"


def _send_checked_request(tracer: Any) -> str:
    """A trace holding auth.check, health.check and feature.flag_check (without an
    experiment.assign): none of the absence rules fires on it."""
    with tracer.start_as_current_span("http.server.request") as root:
        for name in ("auth.check", "health.check", "feature.flag_check"):
            with tracer.start_as_current_span(name):
                pass
    return f"{root.get_span_context().trace_id:032x}"


def _attr(span: Any, key: str) -> Any:
    return next((kv.value.string_value for kv in span.attributes if kv.key == key), None)


# --- absence ------------------------------------------------------------------------------------

@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_rule_true_without_its_spans_fires_on_traces_without_them(
        store: str, request: pytest.FixtureRequest, start_sidecar: Callable[..., Running],
        sdk_client: Callable[..., Any], otlp_receiver: Any,
        wait_until: Callable[..., Any]) -> None:
    url = "memory"
    if store == "redis":
        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
    running = start_sidecar(ABSENCE_RULES, store=url)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    bare = _send_http_server_request(tracer)
    checked = _send_checked_request(tracer)

    wait_until(lambda: {s["rule_id"] for s in running.signals(trace_id=bare)} == ABSENT,
               timeout=10, what="the absence rules on the trace without their spans")
    wait_until(lambda: running.sample("betrace_traces_decided_total") >= 2, timeout=10,
               what="both traces decided")
    assert running.signals(trace_id=checked) == []
    [signal] = running.signals("no-auth-check", bare)
    assert signal["span_ids"] == [] and signal["context"] == {}
    assert running.sample("betrace_traces_dropped_total") == 0
    # Its violation span is the root of a span-less view of the violating trace.
    [(_, violation)] = wait_until(lambda: [
        (r, s) for r, s in otlp_receiver.spans("betrace.violation")
        if s.trace_id.hex() == bare and _attr(s, "betrace.rule.id") == "no-auth-check"],
        timeout=5, what="the violation span")
    assert violation.parent_span_id == b"" and list(violation.links) == []


def test_traces_held_by_id_are_bounded_and_a_dropped_one_is_never_signalled(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any]) -> None:
    running = start_sidecar(ABSENCE_RULES, max_trace_ids=2)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    held = [_send_http_server_request(tracer) for _ in range(2)]
    dropped = _send_http_server_request(tracer)
    wait_until(lambda: all(running.signals("no-auth-check", t) for t in held), timeout=10,
               what="the two held traces decided")
    assert running.sample("betrace_traces_dropped_total", reason="max_trace_ids") == 1
    time.sleep(0.5)  # past its would-be decision
    assert running.signals(trace_id=dropped) == []


def test_replay_judges_every_trace_for_a_rule_true_without_its_spans(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ABSENCE_RULES)
    bare, checked = "1" * 32, "2" * 32
    traces = tmp_path / "traces.jsonl"
    traces.write_text(otlp_line(
        "web", otlp_span(bare, "a" * 16, "http.server.request", 1),
        otlp_span(checked, "b" * 16, "http.server.request", 2),
        *(otlp_span(checked, f"{i:016x}", name, 3 + i) for i, name in enumerate(
            ("auth.check", "health.check", "feature.flag_check"), 1)),
    ) + "\n")
    result = _betrace("replay", "--rules", rules, traces)
    assert result.returncode == 0, result.stderr
    found = {(s["rule_id"], s["trace_id"]) for s in map(json.loads, result.stdout.splitlines())}
    assert found == {(rule, bare) for rule in ABSENT}
    # Every trace is applicable to a rule that fires without its spans.
    assert "no-auth-check: 1 violation(s) in 2 applicable trace(s), 50.00% compliant" \
        in result.stderr


def test_check_warns_about_a_rule_that_fires_without_its_spans(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ABSENCE_RULES)
    result = _betrace("check", rules)
    assert result.returncode == 0, result.stdout + result.stderr
    empty = [line for line in result.stderr.splitlines() if "[fires-without-spans]" in line]
    assert {line.split("rule '")[1].split("'")[0] for line in empty} == ABSENT
    assert all("fires on every trace without" in line for line in empty)


# --- transport skew -----------------------------------------------------------------------------

SKEW_RULES = """
rules:
  - id: big-order
    condition: order.placed.where(total > 100)
    signal:
      context: [cust, total]
  - id: many-logins
    condition: count(user.login) > 5
"""


def test_the_same_spans_give_the_same_signals_over_every_transport(
        start_sidecar: Callable[..., Running], wait_until: Callable[..., Any]) -> None:
    """`cust` sits on the login span only: a signal's context falls back to any span of the
    trace, so every transport must keep it there."""
    trace_id = bytes.fromhex("0123456789abcdef0123456789abcdef")
    login = pb_request(trace_id, ["user.login"], {"cust": "42"}, first_span=1)
    order = pb_request(trace_id, ["order.placed"], {"total": 500}, first_span=2)
    login.resource_spans.extend(order.resource_spans)
    body = login.SerializeToString()
    signals = {}
    for transport in ("grpc", "http-protobuf", "http-json"):
        running = start_sidecar(SKEW_RULES)
        if transport == "grpc":
            with grpc.insecure_channel(f"127.0.0.1:{running.sidecar.grpc_port}") as channel:
                trace_service_pb2_grpc.TraceServiceStub(channel).Export(login, timeout=5)
        elif transport == "http-protobuf":
            assert post(running.sidecar.http_port, body, "application/x-protobuf")[0] == 200
        else:
            doc = json_format.MessageToJson(login)  # protobuf's JSON mapping: base64 ids
            assert post(running.sidecar.http_port, doc.encode(), "application/json")[0] == 200
        [signal] = wait_until(lambda r=running: r.signals("big-order"), timeout=5,
                              what=f"the signal over {transport}")
        del signal["detected_at"]
        signals[transport] = json.dumps(signal, sort_keys=True)
    assert signals["grpc"] == signals["http-protobuf"] == signals["http-json"]
    assert json.loads(signals["grpc"])["context"] == {"cust": "42", "total": 500}


# --- reload skew --------------------------------------------------------------------------------

class _Recording(Emitter):
    def __init__(self) -> None:
        super().__init__(Metrics(CollectorRegistry()))
        self.fired: list[tuple[str, str]] = []

    def emit(self, violation: Violation) -> Any:
        self.fired.append((violation.rule.id, violation.trace.trace_id))
        return super().emit(violation)


def test_a_reload_never_makes_a_buffered_trace_fire_a_rule_it_does_not_break() -> None:
    """The issue's reproduction: `k` was pruned under the old rule, so the new rule would read
    it as missing. A trace that begins after the reload is judged by the new rule in full."""
    old = load_rules_text("rules:\n  - id: pair\n    condition: not (a and b)\n")
    new = load_rules_text("rules:\n  - id: a-has-k\n    when: a\n    always: a.where(k == 1)\n")
    now = [1000.0]
    emitter = _Recording()
    assembler = Assembler(MemoryStore(StoreLimits(decision_wait=1.0)), old, emitter,
                          emitter.metrics, clock=lambda: now[0])
    before, after, broken = "1" * 32, "2" * 32, "3" * 32

    def send(trace_id: str, k: int) -> None:
        request = pb_request(bytes.fromhex(trace_id), ["a"], {"k": k})
        active = assembler.active
        assembler.ingest(active.decoder.decode(request.SerializeToString()).batch, active)

    send(before, 1)  # buffered under the old rules: k is not kept
    now[0] += 0.1
    assembler.set_rules(new)
    now[0] += 0.1
    send(after, 1)
    send(broken, 2)
    now[0] += 5
    assembler.step()
    assert emitter.fired == [("a-has-k", broken)]


# --- rule failure -------------------------------------------------------------------------------

FAILING_RULES = """
rules:
  - id: raises
    condition: boom.where(n > 1)
  - id: charged-twice
    condition: count(payment.charge) > 1
"""


def _break(ruleset: Any) -> Any:
    """Make the `raises` rule raise on every trace holding a `boom` span (a rule bug)."""
    rule = ruleset.rule("raises")
    logic = rule.logic

    def test(trace: Any) -> bool:
        if trace.by_name.get("boom"):
            raise ZeroDivisionError("a rule bug")
        return bool(logic.test(trace))
    object.__setattr__(logic, "test", test)
    return ruleset


def test_live_a_rule_that_raises_is_counted_and_the_others_still_run(
        start_sidecar: Callable[..., Running], wait_until: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    running = start_sidecar(FAILING_RULES)
    running.sidecar.assembler.set_rules(_break(load_rules_text(FAILING_RULES)))
    trace_id = bytes.fromhex("ab" * 16)
    request = pb_request(trace_id, ["boom", "payment.charge", "payment.charge"], {"n": 2})
    assert post(running.sidecar.http_port, request.SerializeToString(),
                "application/x-protobuf")[0] == 200
    wait_until(lambda: running.signals("charged-twice"), timeout=5, what="the other rule")
    wait_until(lambda: running.sample("betrace_rule_errors_total", rule="raises") >= 1,
               timeout=5, what="the rule error counted")
    assert ("ab" * 16) in caplog.text and "rule raises failed" in caplog.text


def test_replay_reports_a_rule_that_raises_and_judges_the_rest(tmp_path: Path) -> None:
    """Through the replay API with a broken rule (a YAML rule cannot be made to raise): the
    summary names the rule, counts its traces and gives the first (`betrace replay` then exits
    4)."""
    from sidecar.replay.runner import replay

    traces = tmp_path / "traces.jsonl"
    trace_id = "cd" * 16
    traces.write_text(otlp_line("svc", otlp_span(trace_id, "1" * 16, "boom", 1, n=2),
                                otlp_span(trace_id, "2" * 16, "payment.charge", 2),
                                otlp_span(trace_id, "3" * 16, "payment.charge", 3)) + "\n")
    signals: list[Any] = []
    summary = replay(_break(load_rules_text(FAILING_RULES)), [str(traces)], signals.append)
    assert [s.rule_id for s in signals] == ["charged-twice"]
    assert summary.rule_errors == 1
    assert any("RULE ERROR on 1 trace(s)" in line and trace_id in line
               for line in summary.lines())


def test_a_store_bug_is_internal_and_a_store_that_is_down_unavailable(
        start_sidecar: Callable[..., Running]) -> None:
    running = start_sidecar()
    store = running.sidecar.store
    request = pb_request(bytes.fromhex("ef" * 16), ["payment.charge"]).SerializeToString()

    def bug(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug in the store")
    store.append = bug  # type: ignore[method-assign]
    status, _, _ = post(running.sidecar.http_port, request, "application/x-protobuf")
    assert status == 500
    with grpc.insecure_channel(f"127.0.0.1:{running.sidecar.grpc_port}") as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.RpcError) as failed:
            export(request, timeout=5)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert running.sample("betrace_export_requests_rejected_total", reason="internal") == 2
    assert running.sample("betrace_store_errors_total") == 0


def test_redis_state_of_another_format_is_refused(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    # 2: before trace states carried their bytes; 3: before span records carried service.version
    for older in ("2", "3"):
        client.flushdb()
        client.set("bt:format", older)
        try:
            with pytest.raises(IncompatibleStore, match=f"format '{older}'"):
                RedisStore.from_url(redis_url)
        finally:
            client.flushdb()
    assert RedisStore.from_url(redis_url).append({}, time.time()).accepted == 0
    assert client.get("bt:format") == b"4"
    # State from before formats were written: shard counts without a format key
    client.delete("bt:format")
    client.hset("bt:{q3}:n", "traces", 1)
    try:
        with pytest.raises(IncompatibleStore, match="none written"):
            RedisStore.from_url(redis_url)
        assert client.get("bt:format") is None  # not claimed over the old state
    finally:
        client.flushdb()


def _betrace(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


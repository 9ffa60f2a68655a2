"""Replay from Tempo: the TraceQL pushdown, and the client against a fake Tempo speaking the
documented API (https://grafana.com/docs/tempo/latest/api_docs/). No live Tempo is involved: see
tests/tempo_fake.py for what the fake and its TraceQL evaluator model."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tempo_fake import FakeTempo, compile_traceql, serve

from sidecar.dsl import glob_matcher, span_names_for
from sidecar.dsl.traceql import ANY_TRACE, pushdowns, rule_query, traceql_for
from sidecar.model.spans import Projection, Span, Trace
from sidecar.otlp.json_spans import InputError
from sidecar.replay.backend import normalize_trace_id
from sidecar.replay.tempo import TempoClient, TempoError
from sidecar.rules import RuleSet, load_rules, load_rules_text
from sidecar.rules.compact import trace_from_compact

RULES = Path(__file__).resolve().parent.parent / "rules"
T0 = 1_790_000_000  # seconds; compact example spans start here
NS = 1_000_000_000


@pytest.fixture
def fake() -> FakeTempo:
    return FakeTempo()


@pytest.fixture
def tempo(fake: FakeTempo) -> Iterator[str]:
    yield from serve(fake)


def client_for(url: str, **options: Any) -> tuple[TempoClient, list[float]]:
    slept: list[float] = []
    return TempoClient(url, sleep=slept.append, **options), slept


def trace(trace_no: int, *spans: tuple[str, dict[str, Any]], at_s: int = T0,
          service: str = "checkout") -> list[Span]:
    trace_id = f"{trace_no:032x}"  # leading zeros: Tempo's search drops them
    return [Span(trace_id, f"{trace_no:08x}{i + 1:08x}", name, service=service,
                 start_ns=at_s * NS + i * 1_000_000, end_ns=at_s * NS + (i + 1) * 1_000_000,
                 attributes=dict(attributes))
            for i, (name, attributes) in enumerate(spans)]


def matches(query: str, spans: list[Span]) -> bool:
    return compile_traceql(query)(spans)


# --- query compilation --------------------------------------------------------------------------

def test_catalog_queries() -> None:
    catalog = load_rules([RULES])
    queries = pushdowns(catalog)
    assert queries["payment-retry-idempotency"] == \
        '{ name = "payment.charge" && (span.attempt > 1 || span.attempt > 1.0) }'
    assert queries["payment-requires-confirmed-reservation"] == '{ name = "payment.charge" }'
    assert traceql_for(load_rules([RULES / "payments.yaml"])) == '{ name = "payment.charge" }'
    assert queries["free-tier-rate-limit"] == (
        '{ name = "api.request" && span.tier = "free" && (span.request_count_1m > 100 || '
        'span.request_count_1m > 100.0) }')
    assert queries["admin-action-audit-log"] == '{ name = "admin.action" }'  # for_each
    assert queries["agent-refund-human-approval"] == (
        '{ name = "agent.refund" && (span.amount > 50 || span.amount > 50.0) }')
    assert queries["phi-access-audit-within-200ms"] == (
        '{ name = "db.query" && (span.db.sql.table = "patient_records" || '
        'span.db.sql.table = "patient_encounters" || span.db.sql.table = "lab_results") }')
    assert queries["slow-db-query"] == ('{ name = "db.query" && (duration > 1000ms || '
                                       'span.duration_ms > 1000 || span.duration_ms > 1000.0) }')
    assert queries["http-5xx-without-error-log"] == (
        '{ (kind = server || span.kind = "SERVER") && (span.http.response.status_code >= 500 '
        '|| span.http.response.status_code >= 500.0 || span.http.status_code >= 500 '
        '|| span.http.status_code >= 500.0) }')
    assert ANY_TRACE not in queries.values()  # every catalog rule narrows the search


def test_every_violating_catalog_example_matches_the_query() -> None:
    """The pushdown is never stricter than the rule, on every example the catalog ships."""
    catalog = load_rules([RULES])
    everything = compile_traceql(traceql_for(catalog))
    checked = 0
    for index, example in enumerate(catalog.examples):
        rule = catalog.rule(example.rule_id)
        assert rule is not None
        example_trace = trace_from_compact(example.spans, seed=str(index))
        if rule.evaluate(example_trace) is None:
            continue
        spans = example_trace.spans
        assert matches(rule_query(rule), spans), (rule.id, example.description)
        assert everything(spans), (rule.id, example.description)
        checked += 1
    assert checked >= 15


def test_the_evaluator_models_tempo_typing() -> None:
    """What makes the checks above able to fail: Tempo never compares an int attribute with a
    float literal (or the reverse), so `amount > 50` alone would miss `amount: 120.0`."""
    spans = trace(1, ("agent.refund", {"amount": 120.0}))
    assert not matches('{ span.amount > 50 }', spans)
    assert matches('{ span.amount > 50.0 }', spans)
    assert not matches('{ span.route =~ "ab" }', trace(2, ("x", {"route": "xaby"})))


@pytest.mark.parametrize("condition", [
    "not trace.has(audit.log)",
    "count(http.retry) < 3",
    "count(a) >= count(b)",
    "trace.has(a) or not trace.has(b)",
    '"*".where(attempt != 2)',
    '"*".where(not (attempt > 1))',
])
def test_rules_that_cannot_narrow_fetch_everything(condition: str) -> None:
    ruleset = load_rules_text(f"rules:\n  - id: r\n    condition: '{condition}'\n")
    assert traceql_for(ruleset) == ANY_TRACE
    assert span_names_for(ruleset.rules) is None


def test_quoting_and_escaping() -> None:
    ruleset = load_rules_text(r'''
rules:
  - id: quoted
    condition: |
      "GET /users/*".where("odd \"key\"" == "a\\b\"c" or "with space" matches "^x.y$")
  - id: contains
    condition: 'a.b.where(url contains "1+1=2")'
''')
    queries = pushdowns(ruleset)
    assert queries["quoted"] == (
        r'{ name =~ "(?s)GET /users/.*" && (span."odd \"key\"" = "a\\b\"c" || '
        r'span."with space" =~ "(?s:.*)(?:^x.y$)(?s:.*)") }')
    assert queries["contains"] == r'{ name = "a.b" && span.url =~ "(?s).*1\\+1=2.*" }'
    spans = trace(1, ("GET /users/7", {'odd "key"': 'a\\b"c'}))
    assert matches(queries["quoted"], spans)
    assert matches(queries["contains"], trace(2, ("a.b", {"url": "/?q=1+1=2&x"})))


SYNTHETIC = r'''
rules:
  - id: num-int
    condition: checkout.where(amount > 50)
  - id: num-frac
    condition: checkout.where(amount >= 50.5 or amount < -1.5)
  - id: num-eq
    condition: checkout.where(amount == 7 or amount in [1, 2.5, x, "7"])
  - id: str-order
    condition: checkout.where(currency < "M" and currency >= "B")
  - id: str-ops
    condition: checkout.where(route matches "^/a(b|c)" or route contains "x.y" or currency == EUR)
  - id: negations
    condition: checkout.where(not (amount <= 10 or not paid))
  - id: bare
    condition: checkout.where(paid)
  - id: builtins
    condition: '"*".where(status == ERROR and kind in [SERVER, CONSUMER])'
  - id: duration
    condition: checkout.where(duration_ms > 2.5) or refund.where(duration_ms >= 3)
  - id: service-and-name
    condition: checkout.where(service.name == cart or name == checkout)
  - id: glob
    condition: '"GET /*".where(amount > 1)'
  - id: counts
    condition: count(checkout) > count(refund) or count(refund).where(amount > 5) >= 2
  - id: count-negated
    condition: not (count(checkout) < 2) and count(refund) != count(checkout)
  - id: before
    condition: checkout.where(paid) before refund within 5ms
  - id: when-never
    when: checkout
    never: refund.where(amount > 3)
  - id: dsl-clauses
    condition: when { checkout.where(amount > 1) } always { refund } never { "GET /*" }
  - id: unique
    condition: count(checkout).where(currency == unique) > 1
  - id: zero-count
    condition: count(checkout) <= 1 and refund.where(amount > 5)
  - id: regex
    condition: checkout.where(route matches "b$" or route matches "(?i)X/")
  - id: quoted-key
    condition: |
      checkout.where("odd \"key\"" == "a\\b" or "with space" == x)
'''
SHADOWS = ["ERROR", "SERVER", "checkout", "cart", 5, 2.6, True]  # attributes named like fields
ATTRIBUTES = st.fixed_dictionaries({}, optional={
    "amount": st.sampled_from([-3, -2, -1.5, -2.0, -1, 0, 1, 1.0, 2, 2.5, 5, 6, 7, 7.0, 10, 11,
                               50, 50.5, 51, 51.0, "7", "x", True, (7, 1)]),
    "currency": st.sampled_from(["A", "B", "EUR", "M", "Mz", "Z", "", 5, ("EUR",)]),
    "route": st.sampled_from(["/ab", "x/ab", "/ac/x.y", "x.y", "xzy", "/a\nb", 3]),
    "paid": st.sampled_from([True, False, "true", 1]),
    'odd "key"': st.sampled_from(["a\\b", "x", 1]),
    "with space": st.sampled_from(["x", "y"]),
    **{key: st.sampled_from(SHADOWS) for key in
       ("status", "kind", "name", "service.name", "duration_ms")},
})
NAMES = st.one_of(st.just("checkout"), st.just("refund"),
                  st.sampled_from(["GET /a", "GET /", "POST /a", "GET /\nx"]))
DURATIONS = [0, 1_000_000, 2_500_000, 2_500_001, 2_999_999, 3_000_000, 3_000_001, 9_000_000]


@st.composite
def random_trace(draw: st.DrawFn) -> Trace:
    spans = []
    for i in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, 12)) * 1_000_000
        spans.append(Span(
            "ab" * 16, f"{i + 1:016x}", draw(NAMES),
            start_ns=start, end_ns=start + draw(st.sampled_from(DURATIONS)),
            status=draw(st.sampled_from(["UNSET", "OK", "ERROR"])),
            kind=draw(st.sampled_from(["INTERNAL", "SERVER", "CLIENT", "CONSUMER"])),
            service=draw(st.sampled_from([None, "cart", "x"])),
            attributes=draw(ATTRIBUTES)))
    return Trace("ab" * 16, spans)


_SYNTHETIC = load_rules_text(SYNTHETIC)
_SYNTHETIC_QUERIES = {rule.id: compile_traceql(rule_query(rule)) for rule in _SYNTHETIC.rules}
_SYNTHETIC_ALL = compile_traceql(traceql_for(_SYNTHETIC))
_SYNTHETIC_NAMES = {rule.id: span_names_for([rule]) for rule in _SYNTHETIC.rules}


def holds_a_span_named(names: list[tuple[str, bool]] | None, trace: Trace) -> bool:
    """What a search by span name alone (Jaeger's operation) finds, None: every trace."""
    if names is None:
        return True
    matchers = [glob_matcher(name) if glob else name.__eq__ for name, glob in names]
    return any(match(span.name) for span in trace.spans for match in matchers)


@settings(max_examples=400, deadline=None)
@given(random_trace())
def test_pushdown_is_never_stricter_than_the_rule(generated: Trace) -> None:
    for rule in _SYNTHETIC.rules:
        if rule.evaluate(generated) is not None:
            assert _SYNTHETIC_QUERIES[rule.id](generated.spans), (rule.id, rule_query(rule))
            assert _SYNTHETIC_ALL(generated.spans), rule.id
            assert holds_a_span_named(_SYNTHETIC_NAMES[rule.id], generated), rule.id
            assert holds_a_span_named(span_names_for(_SYNTHETIC.rules), generated), rule.id


def test_synthetic_rules_do_narrow() -> None:
    """The property above is only worth something if the queries filter at all."""
    queries = pushdowns(_SYNTHETIC)
    assert queries["num-frac"] == ('{ name = "checkout" && (span.amount > 50 || '
                                   'span.amount >= 50.5 || span.amount < -1 || '
                                   'span.amount < -1.5) }')
    assert queries["duration"] == ('{ name = "checkout" && (duration > 2500000ns || '
                                   'span.duration_ms > 2 || span.duration_ms > 2.5) } || '
                                   '{ name = "refund" && (duration >= 3ms || '
                                   'span.duration_ms >= 3 || span.duration_ms >= 3.0) }')
    # Of an `and`, one side only: Tempo may check a trace split across blocks block by block.
    assert queries["before"] == '{ name = "checkout" && span.paid = true }'
    assert queries["count-negated"] == '{ name = "checkout" }'
    assert not any("} && {" in q or "} && (" in q for q in queries.values())
    assert sum(q == ANY_TRACE for q in queries.values()) == 0
    # By span name alone, only the rules that select `"*"` search every trace.
    assert [rule_id for rule_id, names in _SYNTHETIC_NAMES.items() if names is None] == \
        ["builtins"]
    assert _SYNTHETIC_NAMES["glob"] == [("GET /*", True)]
    assert _SYNTHETIC_NAMES["counts"] == [("checkout", False), ("refund", False)]
    assert _SYNTHETIC_NAMES["dsl-clauses"] == [("checkout", False)]
    assert span_names_for(_SYNTHETIC.rules) is None  # because of `builtins`


# --- the client: search -------------------------------------------------------------------------

def test_search_splits_full_windows_until_nothing_is_truncated(fake: FakeTempo, tempo: str) -> None:
    stored = {fake.add(trace(n, ("payment.charge", {"attempt": 2}), at_s=T0 + 7 * n))
              for n in range(1, 13)}
    long = trace(99, ("payment.charge", {}), ("payment.charge", {}))
    long[1].start_ns, long[1].end_ns = (T0 + 60) * NS, (T0 + 61) * NS  # spans many windows
    stored.add(fake.add(long))
    fake.add(trace(100, ("GET /health", {})))  # filtered out by the query itself
    client, _ = client_for(tempo)
    found = client.search('{ name = "payment.charge" }', T0, T0 + 100, limit=4)
    assert sorted(found) == sorted(stored)
    assert client.stats.split > 0 and client.stats.truncated == 0
    assert client.stats.candidates == len(stored)
    searches = [r.params for r in fake.requests if r.path == "/api/search"]
    assert all(p["limit"] == "4" and p["spss"] == "1" for p in searches)
    assert searches[0]["start"] == str(T0) and searches[0]["end"] == str(T0 + 100)


def test_a_window_full_at_one_second_is_reported(fake: FakeTempo, tempo: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    ids = {fake.add(trace(n, ("payment.charge", {}))) for n in range(1, 6)}  # one second
    client, _ = client_for(tempo)
    with caplog.at_level(logging.WARNING, logger="sidecar.replay.tempo"):
        found = client.search('{ name = "payment.charge" }', T0 - 10, T0 + 10, limit=2)
    assert set(found) < ids and len(found) >= 2
    assert client.stats.truncated >= 1
    assert "results there may be missing" in caplog.text


def test_jobs_left_unrun_mean_the_window_is_full(fake: FakeTempo, tempo: str) -> None:
    """A Tempo whose max_result_limit is below our limit cuts results short; its metrics show
    jobs left unrun (completedJobs < totalJobs), which must split the window too."""
    fake.server_limit = 3
    ids = {fake.add(trace(n, ("payment.charge", {}), at_s=T0 + 5 * n)) for n in range(1, 9)}
    client, _ = client_for(tempo)
    assert set(client.search('{ name = "payment.charge" }', T0, T0 + 60, limit=100)) == ids
    assert client.stats.split > 0


def test_ranges_longer_than_tempo_allows_are_split(fake: FakeTempo, tempo: str) -> None:
    fake.max_duration_s = 3600
    ids = {fake.add(trace(n, ("payment.charge", {}), at_s=T0 + 1800 * n)) for n in range(1, 9)}
    client, _ = client_for(tempo)
    found = client.search('{ name = "payment.charge" }', T0, T0 + 5 * 3600, limit=50)
    assert set(found) == ids
    widths = [int(r.params["end"]) - int(r.params["start"]) for r in fake.requests]
    assert widths[0] == 5 * 3600 and min(widths) > 1000

    fake.max_duration_s = None
    client.search('{ name = "payment.charge" }', T0, T0 + 3 * 86_400 + 5, max_window=86_400)
    days = [(int(r.params["start"]), int(r.params["end"])) for r in fake.requests[len(widths):]]
    assert days == [(T0, T0 + 86_400), (T0 + 86_400, T0 + 2 * 86_400),
                    (T0 + 2 * 86_400, T0 + 3 * 86_400), (T0 + 3 * 86_400, T0 + 3 * 86_400 + 5)]


# --- the client: fetch --------------------------------------------------------------------------

def payments() -> RuleSet:
    return load_rules([RULES / "payments.yaml"])


def run(ruleset: RuleSet, client: TempoClient, errors: list[InputError] | None,
        since_s: int = T0 - 10, until_s: int = T0 + 1000, **options: Any) -> dict[str, list[Span]]:
    return dict(client.traces(ruleset, since_s * NS, until_s * NS, errors=errors, **options))


def test_fetch_hex_and_base64_ids(fake: FakeTempo, tempo: str) -> None:
    hex_id = fake.add(trace(1, ("payment.charge", {"attempt": 2, "payment_intent_id": "pi_1"})))
    b64_id = fake.add(trace(2, ("payment.charge", {"attempt": 1})), base64_ids=True)
    client, _ = client_for(tempo)
    got = run(payments(), client, [])
    assert set(got) == {hex_id, b64_id}
    assert [s.span_id for s in got[b64_id]] == [f"{2:08x}{1:08x}"]
    assert got[hex_id][0].attributes == {"attempt": 2, "payment_intent_id": "pi_1"}
    assert sorted(fake.paths("/api/v2/traces/")) == [f"/api/v2/traces/{hex_id}",
                                                     f"/api/v2/traces/{b64_id}"]
    assert normalize_trace_id("AAAAAAAAAAAAAAAAAAAAAg==") == f"{2:032x}"
    assert normalize_trace_id("d6e9329d67b6146a") == "0" * 16 + "d6e9329d67b6146a"


def test_a_resource_attribute_comes_along_for_group_by(fake: FakeTempo, tempo: str) -> None:
    """--group-by service.version needs a resource attribute as the span's group (a Span keeps
    service.version as its `version` too), and an attribute no rule reads: the caller widens
    the projection and names the resource key."""
    trace_id = fake.add(trace(1, ("payment.charge", {"attempt": 2, "region": "eu"}),
                              ("payment.charge", {"attempt": 3})),
                        resource={"service.version": "1.4.2"})
    ruleset = payments()
    narrow = ruleset.projection()
    wider = Projection(narrow.wants_name, None)  # every attribute of the spans rules select
    client, _ = client_for(tempo)
    [(got_id, spans)] = list(client.traces(
        ruleset, (T0 - 5) * NS, (T0 + 5) * NS, errors=[], projection=wider,
        resource_key="service.version"))
    assert got_id == trace_id and [span.group for span in spans] == ["1.4.2", "1.4.2"]
    assert spans[0].attributes["region"] == "eu" and spans[0].service == "checkout"
    assert [span.version for span in spans] == ["1.4.2", "1.4.2"]


def test_our_own_violation_spans_are_not_evaluated(fake: FakeTempo, tempo: str) -> None:
    """betrace.violation spans land in the traces they flag (in Tempo too); like the live path
    and file replay, a replay from Tempo ignores them, even for a rule that selects every span."""
    ruleset = load_rules_text("rules:\n  - id: any-server\n"
                              "    condition: '\"*\".where(kind == SERVER)'\n")
    spans = trace(1, ("checkout", {}), ("betrace.violation", {"betrace.rule.id": "x"}))
    spans[1].kind = "SERVER"
    fake.add(spans)
    client, _ = client_for(tempo)
    got = run(ruleset, client, [])
    assert {trace_id: [s.name for s in kept] for trace_id, kept in got.items()} == \
        {spans[0].trace_id: ["checkout"]}  # fetched (the query matched), then left out
    assert not ruleset.evaluate(Trace(spans[0].trace_id, got[spans[0].trace_id]))


def test_older_tempo_without_v2_is_read_from_batches(fake: FakeTempo, tempo: str) -> None:
    fake.v2 = False
    ids = {fake.add(trace(n, ("payment.charge", {}), at_s=T0 + n), base64_ids=n % 2 == 0)
           for n in range(1, 4)}
    client, _ = client_for(tempo)
    got = run(payments(), client, [], workers=1)
    assert set(got) == ids
    assert len(fake.paths("/api/v2/traces/")) == 1  # learnt once, then v1 only
    assert len(fake.paths("/api/traces/")) == 3


def test_an_expired_trace_is_counted_and_skipped(fake: FakeTempo, tempo: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    kept = fake.add(trace(1, ("payment.charge", {})))
    gone = fake.add(trace(2, ("payment.charge", {}), at_s=T0 + 3))
    fake.expired.add(gone)
    client, _ = client_for(tempo)
    stats = client.stats
    with caplog.at_level(logging.WARNING, logger="sidecar.replay.tempo"):
        got = run(payments(), client, errors := [])
    assert set(got) == {kept} and not errors
    assert (stats.candidates, stats.fetched, stats.missing) == (2, 1, 1)
    assert "no longer has it" in caplog.text


def test_5xx_and_429_are_retried_with_backoff(fake: FakeTempo, tempo: str) -> None:
    trace_id = fake.add(trace(1, ("payment.charge", {})))
    fake.fail[f"/api/v2/traces/{trace_id}"] = [(503, {}), (502, {}), (429, {"Retry-After": "3"})]
    fake.fail["/api/search"] = [(500, {})]
    client, slept = client_for(tempo)
    got = run(payments(), client, errors := [])
    assert set(got) == {trace_id} and not errors
    assert sorted(slept) == [0.5, 0.5, 1.0, 3.0]  # search 0.5; fetch 0.5, 1.0, Retry-After 3
    assert client.stats.retries == 4


def test_a_trace_that_keeps_failing_is_reported_and_skipped(fake: FakeTempo, tempo: str) -> None:
    bad = fake.add(trace(1, ("payment.charge", {})))
    good = fake.add(trace(2, ("payment.charge", {}), at_s=T0 + 2))
    fake.fail[f"/api/v2/traces/{bad}"] = [(500, {})] * 3
    client, slept = client_for(tempo, retries=2)
    errors: list[InputError] = []
    assert set(run(payments(), client, errors)) == {good}
    assert len(errors) == 1 and client.stats.failed == 1 and len(slept) == 2
    assert errors[0].source == f"{tempo}/api/v2/traces/{bad}"
    assert "HTTP 500" in errors[0].reason

    fake.fail[f"/api/v2/traces/{bad}"] = [(500, {})] * 3
    with pytest.raises(ValueError, match=f"/api/v2/traces/{bad}"):
        run(payments(), client_for(tempo, retries=2)[0], None)


def test_search_errors_name_the_url(fake: FakeTempo, tempo: str) -> None:
    fake.raw["/api/search"] = (400, "text/plain", b'invalid TraceQL query: parse error')
    with pytest.raises(TempoError, match=r"/api/search\?q=.*HTTP 400: invalid TraceQL"):
        client_for(tempo)[0].search("{ nonsense", T0, T0 + 10)
    fake.raw["/api/search"] = (200, "text/html", b"<html>login</html>")
    with pytest.raises(TempoError, match=r"/api/search.*not JSON \(Content-Type text/html\)"):
        client_for(tempo)[0].search("{ }", T0, T0 + 10)
    fake.raw["/api/search"] = (200, "application/json", b'{"traces": [{"traceID": "xyz!"}]}')
    with pytest.raises(TempoError, match="invalid traceID"):
        client_for(tempo)[0].search("{ }", T0, T0 + 10)


def test_unreachable_tempo_and_timeouts(fake: FakeTempo, tempo: str,
                                        free_port: Callable[[], int]) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    client, slept = client_for(closed, retries=2)
    with pytest.raises(TempoError, match=rf"{closed}/api/search.*after 3 attempts"):
        client.search("{ }", T0, T0 + 10)
    assert slept == [0.5, 1.0]

    trace_id = fake.add(trace(1, ("payment.charge", {})))
    fake.delays[f"/api/v2/traces/{trace_id}"] = [0.6]  # once: the retry gets an answer
    client, slept = client_for(tempo, timeout=0.2)
    assert set(run(payments(), client, errors := [])) == {trace_id} and not errors
    assert slept == [0.5]


def test_tenant_and_auth_headers(fake: FakeTempo, tempo: str) -> None:
    fake.add(trace(1, ("payment.charge", {})))
    client, _ = client_for(tempo, org_id="acme", headers={"Authorization": "Bearer t0k"})
    run(payments(), client, [])
    assert {r.headers.get("x-scope-orgid") for r in fake.requests} == {"acme"}
    assert {r.headers.get("authorization") for r in fake.requests} == {"Bearer t0k"}


# --- end to end ---------------------------------------------------------------------------------

def test_replaying_payments_from_tempo_finds_exactly_the_violations(fake: FakeTempo,
                                                                    tempo: str) -> None:
    ruleset = payments()
    expected: set[tuple[str, str]] = set()
    charged = 0
    for index, example in enumerate(ruleset.examples):
        spans = trace_from_compact(example.spans, seed=f"e2e/{index}").spans
        for span in spans:  # a trace every 20 s, so a small limit forces splitting
            span.start_ns += index * 20 * NS
            span.end_ns += index * 20 * NS
        trace_id = fake.add(spans, base64_ids=index % 2 == 1)
        charged += any(s.name == "payment.charge" for s in spans)
        expected |= {(v.rule.id, trace_id) for v in ruleset.evaluate(Trace(trace_id, spans))}
        if example.violates:
            assert (example.rule_id, trace_id) in expected
    unrelated = {fake.add(trace(1000 + n, ("checkout", {}), ("inventory.reserve", {}),
                                at_s=T0 + 3 * n)) for n in range(30)}
    errors: list[InputError] = []
    found: set[tuple[str, str]] = set()
    client, _ = client_for(tempo)
    stats = client.stats
    for trace_id, spans in client.traces(ruleset, (T0 - 5) * NS, (T0 + 400) * NS,
                                         errors=errors, limit=3):
        found |= {(v.rule.id, trace_id) for v in ruleset.evaluate(Trace(trace_id, spans))}
    assert found == expected and len(expected) >= 2
    assert not errors and stats.truncated == 0 and stats.split > 0
    assert stats.query == '{ name = "payment.charge" }'
    assert not any(p.rsplit("/", 1)[1] in unrelated for p in fake.paths("/api/v2/traces/"))
    assert stats.fetched == stats.candidates == charged


# --- betrace replay --tempo, through the real command line ----------------------------------------

def betrace_replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "replay", "--progress", "never",
                           *args], capture_output=True, text=True, timeout=60)


def moment(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def test_betrace_replay_from_tempo_writes_the_signals_and_the_search_figures(
        fake: FakeTempo, tempo: str) -> None:
    ruleset = payments()
    expected = set()
    for index, example in enumerate(ruleset.examples):
        spans = trace_from_compact(example.spans, seed=f"cli/{index}").spans
        for span in spans:
            span.start_ns += index * 20 * NS
            span.end_ns += index * 20 * NS
        trace_id = fake.add(spans, resource={"service.version": f"v{index % 2}"})
        expected |= {(v.rule.id, trace_id) for v in ruleset.evaluate(Trace(trace_id, spans))}
    done = betrace_replay("--rules", str(RULES / "payments.yaml"), "--tempo", tempo,
                          "--since", moment(T0 - 5), "--until", moment(T0 + 400),
                          "--tempo-limit", "3", "--group-by", "service.version")
    assert done.returncode == 0, done.stderr
    found = {(s["rule_id"], s["trace_id"]) for s in map(json.loads, done.stdout.splitlines())}
    assert found == expected and len(expected) >= 2
    assert all(json.loads(line)["mode"] == "replay" for line in done.stdout.splitlines())
    assert 'tempo: query { name = "payment.charge" }' in done.stderr
    assert "service.version=v" in done.stderr

    fake.expired.add(next(iter(expected))[1])  # found by search, gone when fetched
    again = betrace_replay("--rules", str(RULES / "payments.yaml"), "--tempo", tempo,
                           "--since", moment(T0 - 5), "--until", moment(T0 + 400))
    assert again.returncode == 3, again.stderr  # done, but something could not be read
    assert "1 missing" in again.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--tempo", "http://127.0.0.1:9", "x.jsonl"), "either SOURCE files or --tempo"),
    (("--tempo", "http://127.0.0.1:9"), "--tempo needs --since"),
    ((), "nothing to replay"),
    (("--tempo", "http://127.0.0.1:9", "--since", "1h", "--tempo-limit", "0"),
     "--search-limit must be at least 1"),  # --tempo-limit is its older spelling
])
def test_betrace_replay_refuses_unusable_tempo_options(args: tuple[str, ...],
                                                       message: str) -> None:
    done = betrace_replay("--rules", str(RULES / "payments.yaml"), *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_an_unreachable_tempo_is_a_clear_error_naming_the_url(
        free_port: Callable[[], int]) -> None:
    port = free_port()  # nothing listens there
    done = betrace_replay("--rules", str(RULES / "payments.yaml"), "--tempo",
                          f"http://127.0.0.1:{port}", "--since", "1h")
    assert done.returncode == 2, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_a_trace_straddling_the_range_is_evaluated_whole(fake: FakeTempo, tempo: str,
                                                        tmp_path: Path) -> None:
    """--since/--until pick the traces; cutting one at the edge would drop its audit.log and
    make the rule cry wolf."""
    rules = tmp_path / "admin.yaml"
    rules.write_text("rules:\n  - id: audited\n    when: trace.has(admin.action)\n"
                     "    always: trace.has(audit.log)\n")
    audit, action = trace(7, ("audit.log", {}), ("admin.action", {}))
    audit.start_ns, audit.end_ns = (T0 - 100) * NS, (T0 - 99) * NS  # before --since
    fake.add([audit, action])
    done = betrace_replay("--rules", str(rules), "--tempo", tempo, "--since", moment(T0 - 5),
                          "--until", moment(T0 + 5))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "1 fetched" in done.stderr

"""The signal database with real processes: `betrace serve` sidecars writing to a real
PostgreSQL (two sidecars on one Redis, one row per violating trace; the database stopped and
started again under load, nothing lost and the counters moving), `betrace replay` run twice
storing each signal once, and `betrace signals` answering the whitepaper's investigation."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from postgres_servers import PASSWORD, PostgresServer
from test_redis_e2e import PAY, Serve, clean_env, poll, rules_file, send_split  # noqa: F401

from sidecar.routing.dispatcher import Dispatcher
from sidecar.signaldb import SignalDBError, SignalQuery, open_signal_db

REPO = Path(__file__).resolve().parent.parent


def betrace(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, env={**clean_env(), **(env or {})})


def test_two_sidecars_one_postgres_store_one_row_per_violation(
        tmp_path: Path, rules_file: Path, redis_factory: Any, postgres_server: Any,
        sdk_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    redis_url = redis_factory().url
    url = postgres_server.create_database("two_sidecars")
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # (clean_env keeps it for the sidecars)
    sidecars = [Serve(redis_url, rules_file, tmp_path / f"s{n}.jsonl",
                      "--signals-db", url) for n in range(2)]
    try:
        for sidecar in sidecars:
            sidecar.listening()
        tracers = [sdk_client(s.grpc_port, service="checkout", version="5.1.2").tracer
                   for s in sidecars]
        expected = {}
        for i in range(36):
            trace_id, rules = send_split(i, tracers)
            expected.update({(rule, trace_id): None for rule in rules})
        db = open_signal_db(url)
        poll(lambda: db.count() >= len(expected), 30, f"{len(expected)} stored signals")
        time.sleep(1.5)  # a duplicate would have come by now (decision wait 1s)
        rows = list(db.signals(SignalQuery()))
        assert sorted((r.rule_id, r.trace_id) for r in rows) == sorted(expected)
        logged = [line for s in sidecars for line in s.signal_lines()]
        assert sorted(line["signal_id"] for line in logged) == sorted(r.signal_id for r in rows)
        assert {(r.mode, r.modes, r.service) for r in rows} == {("live", ("live",), "checkout")}
        assert {r.service_version for r in rows} == {"5.1.2"}
        assert all(r.rule_digest for r in rows)
        pay = [r for r in rows if r.rule_id == PAY]
        assert all(len(r.context["payment_intent_id"]) == 2 for r in pay)
        stored = sum(s.metric("betrace_signals_delivered_total", sink="signal_db")
                     for s in sidecars)
        assert stored == len(rows)
        for sidecar in sidecars:
            assert sidecar.metric("betrace_signals_dropped_total", sink="signal_db") == 0
            assert "s3cret" not in sidecar.stderr and "PGPASSWORD" not in sidecar.stderr
            sidecar.clean_stderr()
        db.close()
    finally:
        for sidecar in sidecars:
            sidecar.close()


def test_database_down_signals_wait_and_arrive(tmp_path: Path, rules_file: Path,
                                               sdk_client: Any) -> None:
    """PostgreSQL stopped while violations keep coming: ingest goes on (readiness too), the
    errors and the backlog show on /metrics, and once it is back every signal is stored."""
    server = PostgresServer().start()
    try:
        url = server.create_database("down")
        password = tmp_path / "pg-password"
        password.write_text(PASSWORD + "\n")
        sidecar = Serve("memory", rules_file, tmp_path / "s.jsonl", "--signals-db", url,
                        "--signals-db-password-file", str(password))
        try:
            sidecar.listening()
            tracer = sdk_client(sidecar.grpc_port).tracer
            server.stop()
            violating = 0
            for i in range(24):
                _, rules = send_split(i, [tracer])
                violating += len(rules)
            poll(lambda: len(sidecar.signal_lines()) >= violating, 20, "signals in the log")
            poll(lambda: sidecar.metric("betrace_signal_delivery_errors_total",
                                                sink="signal_db") > 0, 20, "db errors")
            backlog = sidecar.metric("betrace_signal_export_backlog", sink="signal_db")
            assert backlog == violating
            assert sidecar.get("/readyz")[0] == 200  # the sidecar still takes spans
            server.start()
            poll(lambda: sidecar.metric("betrace_signal_export_backlog", sink="signal_db") == 0,
                 60, "the backlog written")
            db = open_signal_db(url, password=PASSWORD)
            assert db.count() == violating
            db.close()
            assert sidecar.metric("betrace_signals_delivered_total", sink="signal_db") == violating
            assert sidecar.metric("betrace_signals_dropped_total", sink="signal_db") == 0
            assert "signal_db: reachable again" in sidecar.stderr
            assert PASSWORD not in sidecar.stderr
        finally:
            sidecar.close()
    finally:
        server.cleanup()


def test_dispatcher_counts_what_it_cannot_deliver(free_port: Any) -> None:
    """A database that never answers: beyond the queue, signals are dropped and counted; what
    is still queued at shutdown is counted too. None vanishes uncounted."""
    from test_signaldb import make

    dropped: dict[str, int] = {}
    failures = []
    db = open_signal_db(f"postgresql://u@127.0.0.1:{free_port()}/d")
    dispatcher = Dispatcher("signal_db", db.upsert, (SignalDBError,),
                            delivered=lambda n: pytest.fail("nothing can be delivered"),
                            dropped=lambda reason, n: dropped.update(
                                {reason: dropped.get(reason, 0) + n}),
                            failed=lambda: failures.append(1), max_queue=5, batch=2)
    for i in range(12):
        dispatcher.submit(make(trace=f"{i:032x}"))
    poll(lambda: failures, 10, "a failed attempt")
    assert dispatcher.error and "127.0.0.1" in dispatcher.error
    dispatcher.close(grace=0.5)
    assert dropped["queue_full"] >= 5
    assert dropped["queue_full"] + dropped["shutdown"] == 12


def test_replay_twice_stores_each_signal_once_and_answers_the_investigation(
        signal_db_url: str, tmp_path: Path) -> None:
    sample = str(REPO / "rules" / "samples" / "incidents.otlp.jsonl")
    runs = [betrace("replay", "--rules", "rules/", "--signals-db", signal_db_url, sample,
                    "--progress", "never") for _ in range(2)]
    signals = [json.loads(line) for line in runs[0].stdout.splitlines()]
    assert signals and all(run.returncode == 0 for run in runs), runs[0].stderr
    assert "stored in" in runs[1].stderr
    db = open_signal_db(signal_db_url)
    rows = {r.signal_id: r for r in db.signals(SignalQuery())}
    assert sorted(rows) == sorted(s["signal_id"] for s in signals)
    assert {r.modes for r in rows.values()} == {("replay",)}
    for s in signals:
        row = rows[s["signal_id"]]
        assert (row.service, row.service_version) == (s["service"], s["service_version"])
        assert row.context == s["context"] and row.span_ids == s["span_ids"]
    db.close()

    # the investigation: a date range, grouped by deploy, the order ids as CSV
    pay = next(s for s in signals if "order_id" in s["context"] or "cart.id" in s["context"])
    grouped = betrace("signals", "--signals-db", signal_db_url, "--since", "2020-01-01",
                      "--rule", pay["rule_id"], "--group-by", "service.version",
                      "--format", "jsonl")
    assert grouped.returncode == 0, grouped.stderr
    groups = [json.loads(line) for line in grouped.stdout.splitlines()]
    assert sum(g["count"] for g in groups) == sum(
        1 for s in signals if s["rule_id"] == pay["rule_id"])
    assert {g["service.version"] for g in groups} == {
        s["service_version"] for s in signals if s["rule_id"] == pay["rule_id"]}
    exported = betrace("signals", "--signals-db", signal_db_url, "--rule", pay["rule_id"],
                       "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert {r["trace_id"] for r in table} == {
        s["trace_id"] for s in signals if s["rule_id"] == pay["rule_id"]}
    assert "service_version" in table[0]


def test_signals_command_errors_are_clear(tmp_path: Path) -> None:
    missing = betrace("signals")
    assert missing.returncode == 2 and "--signals-db URL" in missing.stderr
    bad = betrace("signals", "--signals-db", "mysql://x")
    assert bad.returncode == 2 and "scheme 'mysql' unknown" in bad.stderr
    where = betrace("signals", "--signals-db", f"sqlite:///{tmp_path}/s.db", "--where", "x")
    assert where.returncode == 2 and "expected ATTR=VALUE" in where.stderr
    when = betrace("signals", "--signals-db", f"sqlite:///{tmp_path}/s.db", "--since", "soon")
    assert when.returncode == 2 and "invalid time 'soon'" in when.stderr
    empty = betrace("signals", "--signals-db", f"sqlite:///{tmp_path}/s.db")
    assert empty.returncode == 0 and empty.stdout.startswith("WHEN")


def test_ui_refuses_bad_options(tmp_path: Path) -> None:
    missing = betrace("ui")
    assert missing.returncode == 2 and "--signals-db URL" in missing.stderr
    empty = betrace("ui", "--signals-db", f"sqlite:///{tmp_path}/none.db")
    assert empty.returncode == 2 and "no such file" in empty.stderr
    assert not (tmp_path / "none.db").exists()  # a reader never creates the database
    link = betrace("ui", "--signals-db", f"sqlite:///{tmp_path}/none.db", "--trace-url", "x")
    assert link.returncode == 2 and "no {trace_id}" in link.stderr
    rules = tmp_path / "bad.yaml"
    rules.write_text("rules: [x")
    db = f"sqlite:///{tmp_path}/s.db"
    assert betrace("replay", "--rules", "rules/", "--signals-db", db, "--progress", "never",
                   str(REPO / "rules" / "samples" / "incidents.otlp.jsonl")).returncode == 0
    bad = betrace("ui", "--signals-db", db, "--rules", str(rules))
    assert bad.returncode == 2 and "bad.yaml:1:" in bad.stderr


def test_serve_refuses_a_bad_signals_db(tmp_path: Path, rules_file: Path) -> None:
    bad = betrace("serve", "--rules", str(rules_file), "--signals-db", "mysql://x")
    assert bad.returncode == 2 and "signals-db: signal database URL scheme" in bad.stderr
    unreadable = betrace("serve", "--rules", str(rules_file), "--listen", "127.0.0.1:0",
                         "--http-listen", "", "--metrics-listen", "", "--signals-db",
                         "postgresql://u@127.0.0.1:1/d", "--signals-db-password-file",
                         str(tmp_path / "nope"))
    assert unreadable.returncode == 2 and "password file" in unreadable.stderr


def test_unreachable_database_at_replay_start_is_exit_2(free_port: Any) -> None:
    run = betrace("replay", "--rules", "rules/", "--signals-db",
                  f"postgresql://u@127.0.0.1:{free_port()}/d",
                  str(REPO / "rules" / "samples" / "incidents.otlp.jsonl"))
    assert run.returncode == 2 and "signal database postgresql://u@127.0.0.1" in run.stderr
    assert not run.stdout  # nothing replayed
    with pytest.raises(SignalDBError):
        open_signal_db(f"postgresql://u@127.0.0.1:{free_port()}/d").connect()

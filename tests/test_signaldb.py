"""The signal database's contract, run on SQLite and on a real PostgreSQL alike: idempotent by
signal_id, the filters and groupings `betrace signals` offers, retention, migrations, errors."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

import pytest

from sidecar.model.signals import Signal, signal_id
from sidecar.signaldb import (
    IncompatibleSchema,
    SignalDBError,
    SignalQuery,
    open_signal_db,
    read_password,
)
from sidecar.signaldb.database import migrations


def make(rule: str = "payment-idempotency", trace: str = "a" * 32, **changes: Any) -> Signal:
    base = Signal(
        signal_id=signal_id(rule, trace), rule_id=rule, rule_name=rule.replace("-", " "),
        severity="critical", trace_id=trace, span_ids=["1" * 16, "2" * 16],
        message="one payment_intent_id per order",
        context={"order_id": "ord_1", "payment_intent_id": ["pi_1", "pi_2"], "attempt": 2},
        mode="replay", detected_at="2026-11-25T02:32:00.000Z",
        violation_time="2026-10-27T09:42:00.000Z", service="payments",
        service_version="2.4.1", rule_digest="d1")
    return replace(base, **changes)


@pytest.fixture
def db(signal_db_url: str) -> Any:
    database = open_signal_db(signal_db_url)
    database.connect()
    yield database
    database.close()


def test_round_trip_keeps_every_field(db: Any) -> None:
    signal = make()
    db.upsert([signal])
    [row] = db.signals(SignalQuery())
    assert row.as_dict() == {
        **signal.as_dict(), "modes": ["replay"], "last_seen": signal.detected_at}


def test_one_row_per_signal_id_first_detection_kept(db: Any) -> None:
    first = make(mode="live", detected_at="2026-11-25T02:00:00.000Z")
    again = make(mode="live", detected_at="2026-11-25T02:05:00.000Z")
    replayed = make(mode="replay", detected_at="2026-11-26T08:00:00.000Z",
                    context={"order_id": "changed"})
    db.upsert([first])
    db.upsert([again, replayed])
    db.upsert([replayed])  # a replay run twice
    [row] = db.signals(SignalQuery())
    assert (row.mode, row.detected_at, row.last_seen) == (
        "live", "2026-11-25T02:00:00.000Z", "2026-11-26T08:00:00.000Z")
    assert row.modes == ("live", "replay")
    assert row.context["order_id"] == "ord_1"  # the first detection's context
    assert db.count() == 1


def test_an_earlier_detection_arriving_later_becomes_the_first(db: Any) -> None:
    db.upsert([make(mode="replay", detected_at="2026-11-26T00:00:00.000Z")])
    db.upsert([make(mode="live", detected_at="2026-11-25T00:00:00.000Z")])
    [row] = db.signals(SignalQuery())
    assert (row.mode, row.detected_at, row.last_seen) == (
        "live", "2026-11-25T00:00:00.000Z", "2026-11-26T00:00:00.000Z")


def _traffic(db: Any) -> None:
    rows = []
    for i in range(30):
        rows.append(make(trace=f"{i:032x}", context={"order_id": f"ord_{i}", "attempt": i % 3,
                                                     "payment_intent_id": [f"pi_{i}", "pi_x"]},
                         violation_time=f"2026-10-{10 + i % 20:02d}T09:00:00.000Z",
                         service_version="2.4.1" if i % 3 else "2.4.0",
                         severity="critical" if i % 2 else "high"))
    rows.append(make(rule="admin-audited", trace="f" * 32, service="admin-api",
                     service_version="1.0.0", mode="live", violation_time=None,
                     detected_at="2026-11-01T00:00:00.000Z", context={"admin.id": "adm_1"}))
    db.upsert(rows)


def test_filters(db: Any) -> None:
    _traffic(db)
    ids = lambda **q: {s.trace_id for s in db.signals(SignalQuery(**q))}  # noqa: E731
    assert len(ids()) == 31
    assert ids(rules=("admin-audited",)) == {"f" * 32}
    assert len(ids(severities=("critical",))) == 15 + 1  # (the admin row too)
    assert ids(services=("admin-api",)) == {"f" * 32}
    assert ids(modes=("live",)) == {"f" * 32}
    # time range: the violation's time, else the detection's
    assert len(ids(since="2026-10-25T00:00:00.000Z")) == sum(
        1 for i in range(30) if 10 + i % 20 >= 25) + 1
    assert ids(since="2026-10-29T09:00:00.000Z", until="2026-11-01T00:00:00.001Z") == {
        f"{i:032x}" for i in range(30) if 10 + i % 20 == 29} | {"f" * 32}
    assert ids(where=(("order_id", "ord_7"),)) == {f"{7:032x}"}
    assert len(ids(where=(("payment_intent_id", "pi_x"),))) == 30  # any element of a list
    assert ids(where=(("attempt", "2"),)) == {f"{i:032x}" for i in range(30) if i % 3 == 2}
    assert ids(where=(("service.version", "2.4.0"),)) == {f"{i:032x}" for i in range(0, 30, 3)}
    assert ids(where=(("order_id", "nope"),)) == set()
    assert ids(where=(("order_id", "NaN"),)) == set() == ids(where=(("attempt", "Infinity"),))
    assert ids(where=(("no.such.key", "x"),)) == set()


def test_context_keys_of_the_matching_signals(db: Any) -> None:
    _traffic(db)
    assert db.context_keys(SignalQuery()) == [
        "admin.id", "attempt", "order_id", "payment_intent_id"]
    assert db.context_keys(SignalQuery(rules=("admin-audited",))) == ["admin.id"]
    assert db.context_keys(SignalQuery(rules=("nothing",))) == []


def test_listing_streams_past_one_fetch(db: Any) -> None:
    db.upsert([make(trace=f"{i:032x}") for i in range(2500)])  # > STREAM_BATCH
    listed = db.signals(SignalQuery())
    first = next(listed)
    rest = list(listed)
    ids = [first.signal_id] + [row.signal_id for row in rest]
    assert len(set(ids)) == 2500 and ids == sorted(ids)  # one time: by signal_id


def test_newest_first_and_limit(db: Any) -> None:
    _traffic(db)
    rows = list(db.signals(SignalQuery(limit=5)))
    assert len(rows) == 5
    page_two = list(db.signals(SignalQuery(limit=5, offset=5)))
    assert [r.signal_id for r in page_two] == [
        r.signal_id for r in list(db.signals(SignalQuery()))[5:10]]
    times = [r.occurred_at for r in rows]
    assert times == sorted(times, reverse=True)
    assert rows[0].trace_id == "f" * 32


def test_group_by_column_and_context(db: Any) -> None:
    _traffic(db)
    groups = db.groups(SignalQuery(rules=("payment-idempotency",)), "service.version")
    assert [(g.value, g.count) for g in groups] == [("2.4.1", 20), ("2.4.0", 10)]
    assert groups[1].first == "2026-10-10T09:00:00.000Z"
    assert groups[1].last == "2026-10-28T09:00:00.000Z"
    by_attempt = db.groups(SignalQuery(rules=("payment-idempotency",)), "attempt")
    assert sorted((g.value, g.count) for g in by_attempt) == [("0", 10), ("1", 10), ("2", 10)]
    lists = db.groups(SignalQuery(where=(("order_id", "ord_3"),)), "payment_intent_id")
    assert [(g.value, g.count) for g in lists] == [('["pi_3","pi_x"]', 1)]
    missing = db.groups(SignalQuery(), "admin.id")
    assert sorted((str(g.value), g.count) for g in missing) == [("None", 30), ("adm_1", 1)]


def test_prune_deletes_only_older_in_batches(db: Any) -> None:
    _traffic(db)
    assert db.prune("2026-10-15T00:00:00.000Z", batch=2) == 2
    while db.prune("2026-10-15T00:00:00.000Z", batch=2) == 2:
        pass
    left = {s.occurred_at for s in db.signals(SignalQuery())}
    assert min(left) >= "2026-10-15T00:00:00.000Z"
    assert db.count() == 31 - 10


def test_reconnect_is_idempotent_and_schema_recorded(signal_db_url: str) -> None:
    for _ in range(2):
        database = open_signal_db(signal_db_url)
        database.connect()
        database.upsert([make()])
        database.close()
    database = open_signal_db(signal_db_url)
    assert database.count() == 1
    database.close()


def test_newer_schema_refused(signal_db_url: str) -> None:
    database = open_signal_db(signal_db_url)
    database.connect()
    newer = migrations(database.dialect)[-1][0] + 1
    applied = "now()" if database.dialect == "postgresql" else "'x'"
    with database._transaction() as cursor:
        cursor.execute(f"INSERT INTO betrace_schema VALUES ({newer}, {applied})")
    database.close()
    with pytest.raises(IncompatibleSchema, match=f"schema version {newer}"):
        open_signal_db(signal_db_url).connect()


def test_bad_urls_are_named() -> None:
    with pytest.raises(ValueError, match="scheme 'mysql' unknown"):
        open_signal_db("mysql://x/y")
    with pytest.raises(ValueError, match="names no file"):
        open_signal_db("sqlite:///")
    with pytest.raises(ValueError, match="not a valid PostgreSQL URL") as caught:
        open_signal_db("postgresql://u:hunter2@h/d?nonsense=1")
    assert "hunter2" not in str(caught.value)


def test_unreachable_postgres_is_a_clear_error_without_password(free_port: Any) -> None:
    database = open_signal_db(f"postgresql://u@127.0.0.1:{free_port()}/d", password="hunter2")
    with pytest.raises(SignalDBError) as caught:
        database.connect()
    assert "127.0.0.1" in str(caught.value) and "hunter2" not in str(caught.value)


def test_wrong_password_refused_and_password_file_works(postgres_server: Any, tmp_path: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from postgres_servers import PASSWORD

    monkeypatch.delenv("PGPASSWORD", raising=False)
    url = postgres_server.create_database("password_check")
    with pytest.raises(SignalDBError, match="password authentication failed"):
        open_signal_db(url, password="wrong").connect()
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")  # as a Secret mounts it
    database = open_signal_db(url, password=read_password(str(secret)))
    database.connect()
    assert database.count() == 0
    database.close()
    with pytest.raises(SignalDBError, match="password file"):
        read_password(str(tmp_path / "missing"))


def test_sqlite_file_readable_by_plain_sqlite(tmp_path: Any) -> None:
    """The database is an ordinary SQLite file: any SQL tool can read it."""
    database = open_signal_db(f"sqlite:///{tmp_path}/s.db")
    database.connect()
    database.upsert([make()])
    database.close()
    with sqlite3.connect(tmp_path / "s.db") as plain:
        assert plain.execute("SELECT rule_id, service_version, json_extract(context, "
                             "'$.order_id') FROM signals").fetchall() == [
            ("payment-idempotency", "2.4.1", "ord_1")]


def test_retention_prunes_what_occurred_before_its_window(signal_db_url: str) -> None:
    import threading

    from sidecar.signaldb.writer import Retention

    database = open_signal_db(signal_db_url)
    database.connect()
    _traffic(database)
    # "now" is 2026-10-20T00:00Z and the retention 5 days: violations before the 15th go
    now = 1_792_454_400.0  # 2026-10-20T00:00:00Z
    retention = Retention(open_signal_db(signal_db_url), 5 * 86400, clock=lambda: now)
    assert retention.prune(threading.Event()) == 10
    assert min(s.occurred_at for s in database.signals(SignalQuery())) >= \
        "2026-10-15T00:00:00.000Z"
    stop = threading.Event()
    stop.set()
    retention.run(stop)  # one pass, then it sees the stop and closes its connection
    assert retention.db._connection is None
    database.close()


def test_counts_by_day(db: Any) -> None:
    _traffic(db)
    days = db.counts_by_day(SignalQuery())
    assert sum(n for _, _, n in days) == 31
    assert ("2026-11-01", "admin-audited", 1) in days
    assert ("2026-10-10", "payment-idempotency", 2) in days  # i = 0 and 20
    assert [d for d, _, _ in days] == sorted(d for d, _, _ in days)


def test_a_reader_never_writes(signal_db_url: str) -> None:
    reader = open_signal_db(signal_db_url, read_only=True)
    with pytest.raises(SignalDBError, match="holds no signals yet|no such file"):
        reader.connect()
    writer = open_signal_db(signal_db_url)
    writer.connect()
    writer.upsert([make()])
    writer.close()
    reader = open_signal_db(signal_db_url, read_only=True)
    assert reader.count() == 1
    with pytest.raises(SignalDBError, match="read-only|readonly"):
        reader.upsert([make(trace="b" * 32)])
    reader.close()
    reader = open_signal_db(signal_db_url, read_only=True)
    assert [s.trace_id for s in reader.signals(SignalQuery())] == ["a" * 32]
    reader.close()

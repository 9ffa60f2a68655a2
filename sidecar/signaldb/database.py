"""The signal database: one SQL schema and one query builder over two dialects (SQLite for one
sidecar or a laptop, PostgreSQL for a fleet). Each dialect is a subclass that says how it
connects, quotes and compares; everything else is here, so both answer alike (one contract
suite runs on both)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

from sidecar.model.signals import Signal
from sidecar.signaldb.query import COLUMNS, Group, SignalQuery, StoredSignal

FIELDS = ("signal_id", "rule_id", "rule_name", "rule_digest", "severity", "trace_id",
          "span_ids", "message", "context", "service", "service_version", "mode", "modes",
          "detected_at", "last_seen", "violation_time", "occurred_at")
TIMES = frozenset(("detected_at", "last_seen", "violation_time", "occurred_at"))
PRUNE_BATCH = 5000  # rows deleted per statement: retention never holds a long lock
STREAM_BATCH = 1000  # rows fetched at a time while listing signals


class SignalDBError(Exception):
    """The database could not be reached or refused an operation; the message says which and
    why (never the password)."""


class IncompatibleSchema(SignalDBError):
    """The database holds a newer schema than this version knows: refuse rather than mix."""


def migrations(dialect: str) -> list[tuple[int, str]]:
    """(version, SQL) of every migration shipped for `dialect`, in order."""
    folder = resources.files("sidecar.signaldb") / "migrations" / dialect
    found = sorted((int(item.name.split("_", 1)[0]), item.read_text(encoding="utf-8"))
                   for item in folder.iterdir() if item.name.endswith(".sql"))
    return found


class SignalDB:
    """Signals kept by `signal_id`: stored once however often they are found (two sidecars, a
    restart, a replay run twice), with the first detection's time and mode, every mode seen
    and the last detection. Not thread-safe: one thread uses one instance."""

    dialect = ""
    placeholder = "?"
    errors: tuple[type[BaseException], ...] = ()  # the driver's exceptions, as SignalDBError

    def __init__(self, target: str, read_only: bool = False) -> None:
        self.target = target  # what error messages name: a path, or the URL without password
        self.read_only = read_only  # never write: the schema is checked, not migrated
        self._connection: Any = None

    # -- dialect hooks ---------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _migrate(self, connection: Any) -> None:
        raise NotImplementedError

    def _upsert_sql(self) -> str:
        raise NotImplementedError

    def _json(self, value: Any) -> Any:
        """A JSON column's value as read back, as Python objects."""
        raise NotImplementedError

    def _context_value(self, key: str) -> tuple[str, list[Any]]:
        """SQL for a context attribute's value as text (arrays as JSON text), and its params."""
        raise NotImplementedError

    def _context_match(self, key: str, value: str) -> tuple[str, list[Any]]:
        """SQL true when the attribute's text, or any element's, equals `value`."""
        raise NotImplementedError

    def _context_keys(self) -> tuple[str, str]:
        """SQL for (a context key, the FROM clause giving one row per key of each signal)."""
        raise NotImplementedError

    def _cursor(self, connection: Any, streaming: bool) -> Any:
        """A cursor; `streaming`: one that fetches rows as they are read, not all at once."""
        return connection.cursor()

    def _time(self, column: str) -> str:
        """SQL for a time column as RFC 3339 text ("2026-11-25T02:32:00.000Z")."""
        return column

    def _time_param(self) -> str:
        return self.placeholder

    def _day(self, column: str) -> str:
        """SQL for a time column's UTC day as YYYY-MM-DD text."""
        return f"substr({column}, 1, 10)"

    # -- the protocol ----------------------------------------------------------------------

    def connect(self) -> None:
        """Connect and bring the schema up to date, or for a reader check it (raises
        SignalDBError, or IncompatibleSchema for a schema newer than this version's)."""
        self._conn()

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except self.errors:
                pass
            self._connection = None

    def upsert(self, signals: Sequence[Signal]) -> None:
        """Store each signal once by its id, in one transaction."""
        if not signals:
            return
        rows = [self._row(signal) for signal in signals]
        with self._transaction() as cursor:
            cursor.executemany(self._upsert_sql(), rows)

    def signals(self, query: SignalQuery) -> Iterator[StoredSignal]:
        """The matching signals, newest first (by occurred_at, then id)."""
        where, params = self._where(query)
        columns = ", ".join(self._time(f) if f in TIMES else f for f in FIELDS)
        sql = f"SELECT {columns} FROM signals{where} ORDER BY occurred_at DESC, signal_id"
        if query.limit is not None:
            sql += f" LIMIT {int(query.limit)}"
        if query.offset:
            sql += f" OFFSET {int(query.offset)}"
        with self._transaction(streaming=True) as cursor:
            cursor.execute(sql, params)
            while rows := cursor.fetchmany(STREAM_BATCH):
                yield from map(self._decode, rows)

    def context_keys(self, query: SignalQuery) -> list[str]:
        """Every context attribute the matching signals hold, sorted (a CSV's columns)."""
        where, params = self._where(query)
        key, source = self._context_keys()
        with self._transaction() as cursor:
            cursor.execute(f"SELECT DISTINCT {key} FROM {source}{where}", params)
            return sorted(key for (key,) in cursor.fetchall())

    def groups(self, query: SignalQuery, by: str) -> list[Group]:
        """Counts and first/last times per value of `by` (a column such as service.version, or
        any context attribute), largest group first."""
        where, params = self._where(query)
        column = COLUMNS.get(by)
        if column is not None:
            value, value_params = column, []
        else:
            value, value_params = self._context_value(by)
        sql = (f"SELECT {value} AS value, count(*), {self._time('min(occurred_at)')}, "
               f"{self._time('max(occurred_at)')} FROM signals{where} GROUP BY 1 "
               f"ORDER BY 2 DESC, 1")
        with self._transaction() as cursor:
            cursor.execute(sql, value_params + params)
            rows = cursor.fetchall()
        return [Group(_group_value(value), count, first, last)
                for value, count, first, last in rows]

    def counts_by_day(self, query: SignalQuery) -> list[tuple[str, str, int]]:
        """(day as YYYY-MM-DD in UTC, rule id, signals) for the matching signals, by day."""
        where, params = self._where(query)
        day = self._day("occurred_at")
        with self._transaction() as cursor:
            cursor.execute(f"SELECT {day}, rule_id, count(*) FROM signals{where} "
                           "GROUP BY 1, 2 ORDER BY 1, 2", params)
            return [(str(d), rule, int(n)) for d, rule, n in cursor.fetchall()]

    def count(self, query: SignalQuery = SignalQuery()) -> int:
        where, params = self._where(query)
        with self._transaction() as cursor:
            cursor.execute(f"SELECT count(*) FROM signals{where}", params)
            return int(cursor.fetchone()[0])

    def prune(self, before: str, batch: int = PRUNE_BATCH) -> int:
        """Delete up to `batch` signals that occurred before `before` (RFC 3339); returns how
        many. Call again until it returns less than `batch`."""
        p, t = self.placeholder, self._time_param()
        with self._transaction() as cursor:
            cursor.execute(f"DELETE FROM signals WHERE signal_id IN (SELECT signal_id FROM "
                           f"signals WHERE occurred_at < {t} LIMIT {p})", [before, batch])
            return max(0, cursor.rowcount)

    # -- shared machinery ------------------------------------------------------------------

    def _row(self, signal: Signal) -> tuple[Any, ...]:
        """The columns of FIELDS for a new row."""
        return (signal.signal_id, signal.rule_id, signal.rule_name, signal.rule_digest,
                signal.severity, signal.trace_id, json.dumps(signal.span_ids), signal.message,
                json.dumps(signal.context, ensure_ascii=False, default=str, sort_keys=True),
                signal.service, signal.service_version, signal.mode, signal.mode,
                signal.detected_at, signal.detected_at, signal.violation_time,
                signal.violation_time or signal.detected_at)

    def _decode(self, row: Sequence[Any]) -> StoredSignal:
        (signal_id, rule_id, rule_name, digest, severity, trace_id, span_ids, message, context,
         service, version, mode, modes, detected, last, violation, occurred) = row
        return StoredSignal(signal_id, rule_id, rule_name, digest, severity, trace_id,
                            self._json(span_ids), message, self._json(context), service,
                            version, mode, tuple(modes.split(",")), detected, last, violation,
                            occurred)

    def _conn(self) -> Any:
        if self._connection is None:
            try:
                connection = self._connect()
            except self.errors as exc:
                raise SignalDBError(f"signal database {self.target}: {_reason(exc)}") from None
            try:
                if self.read_only:
                    self._check_schema(connection)
                else:
                    self._migrate(connection)
            except BaseException as exc:
                connection.close()
                if isinstance(exc, self.errors):
                    raise SignalDBError(f"signal database {self.target}: {_reason(exc)}") \
                        from None
                raise
            self._connection = connection
        return self._connection

    def _check_schema(self, connection: Any) -> None:
        """For a reader: the schema must be this version's (a reader never migrates)."""
        cursor = connection.cursor()
        try:
            cursor.execute("SELECT max(version) FROM betrace_schema")
            current = cursor.fetchone()[0]
        except self.errors:
            raise SignalDBError(f"signal database {self.target} holds no signals yet (no "
                                "betrace_schema table): point `serve` or `replay` at it with "
                                "--signals-db first") from None
        finally:
            cursor.close()
            connection.rollback()
        if self._pending(current):
            raise SignalDBError(f"signal database {self.target} has schema version {current}, "
                                f"older than this BeTrace's: run `serve` or `replay` with "
                                "--signals-db once to migrate it")

    def _pending(self, current: int | None) -> list[tuple[int, str]]:
        """The migrations a database at schema version `current` (None: new) still needs;
        IncompatibleSchema if it is newer than this version knows."""
        shipped = migrations(self.dialect)
        current = current or 0
        if current > shipped[-1][0]:
            raise IncompatibleSchema(
                f"signal database {self.target} has schema version {current}; this BeTrace "
                f"knows up to {shipped[-1][0]}: upgrade BeTrace, or use another database")
        return [(version, sql) for version, sql in shipped if version > current]

    def _transaction(self, streaming: bool = False) -> _Transaction:
        return _Transaction(self, streaming)

    def _where(self, query: SignalQuery) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        p = self.placeholder
        for column, values in (("rule_id", query.rules), ("severity", query.severities),
                               ("service", query.services), ("mode", query.modes)):
            if values:
                clauses.append(f"{column} IN ({', '.join([p] * len(values))})")
                params += values
        if query.since is not None:
            clauses.append(f"occurred_at >= {self._time_param()}")
            params.append(query.since)
        if query.until is not None:
            clauses.append(f"occurred_at < {self._time_param()}")
            params.append(query.until)
        for key, value in query.where:
            column = COLUMNS.get(key)
            if column is not None:
                clauses.append(f"{column} = {p}")
                params.append(value)
            else:
                sql, more = self._context_match(key, value)
                clauses.append(sql)
                params += more
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class _Transaction:
    """A cursor in one transaction: committed on success, rolled back on error; a driver error
    drops the connection (the next call reconnects) and is raised as SignalDBError."""

    def __init__(self, db: SignalDB, streaming: bool) -> None:
        self.db, self.streaming = db, streaming

    def __enter__(self) -> Any:
        self.connection = self.db._conn()
        try:
            self.cursor = self.db._cursor(self.connection, self.streaming)
        except self.db.errors as exc:
            self.db.close()
            raise SignalDBError(f"signal database {self.db.target}: {_reason(exc)}") from None
        return self.cursor

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        db = self.db
        try:
            self.cursor.close()
            if exc is None:
                self.connection.commit()
            else:
                self.connection.rollback()
        except db.errors as error:
            db.close()
            if exc is None:
                raise SignalDBError(f"signal database {db.target}: {_reason(error)}") \
                    from None
            # (already failing, or a listing abandoned half-way: that is what is raised)
        if exc is not None and isinstance(exc, db.errors):
            db.close()
            raise SignalDBError(f"signal database {db.target}: {_reason(exc)}") from None
        return False


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _group_value(value: Any) -> Any:
    """Group values alike on both databases: JSON text of lists and maps without spaces."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.dumps(json.loads(value), ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            return value
    return value

"""SQLite (the standard library's): the embedded signal database of one sidecar or a replay on
a laptop. WAL mode, so `betrace signals` reads while a sidecar writes."""

from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sidecar.signaldb.database import (
    FIELDS,
    SignalDB,
)

_BUSY_MS = 10_000  # wait this long for another process's write lock


class SqliteSignalDB(SignalDB):
    dialect = "sqlite"
    placeholder = "?"
    errors = (sqlite3.Error,)

    def __init__(self, path: str, read_only: bool = False) -> None:
        super().__init__(path, read_only)
        self.path = path

    def _connect(self) -> _Begun:
        if self.read_only and not Path(self.path).is_file():
            raise sqlite3.OperationalError(f"no such file: {self.path}")  # (never created)
        if not self.read_only:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # autocommit at the driver: transactions are begun here, explicitly
        mode = "ro" if self.read_only else "rwc"
        connection = sqlite3.connect(f"file:{quote(self.path)}?mode={mode}", uri=True,
                                     timeout=_BUSY_MS / 1000, isolation_level=None,
                                     check_same_thread=False)
        if not self.read_only:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at each checkpoint
        return _Begun(connection, optimize=not self.read_only)

    def _migrate(self, connection: Any) -> None:
        raw = connection.raw
        raw.execute("CREATE TABLE IF NOT EXISTS betrace_schema "
                    "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        raw.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it
        try:
            current = raw.execute("SELECT max(version) FROM betrace_schema").fetchone()[0]
            for version, sql in self._pending(current):
                for statement in _statements(sql):
                    raw.execute(statement)
                raw.execute("INSERT INTO betrace_schema VALUES (?, ?)",
                            (version, datetime.datetime.now(datetime.timezone.utc).isoformat()))
            raw.execute("COMMIT")
        except BaseException:
            raw.execute("ROLLBACK")
            raise

    def _upsert_sql(self) -> str:
        return (f"INSERT INTO signals ({', '.join(FIELDS)}) VALUES "
                f"({', '.join('?' * len(FIELDS))}) ON CONFLICT (signal_id) DO UPDATE SET "
                "mode = CASE WHEN excluded.detected_at < signals.detected_at "
                "THEN excluded.mode ELSE signals.mode END, "
                "detected_at = min(signals.detected_at, excluded.detected_at), "
                "last_seen = max(signals.last_seen, excluded.last_seen), "
                "modes = CASE WHEN instr(',' || signals.modes || ',', ',' || excluded.mode || ',')"
                " > 0 THEN signals.modes ELSE signals.modes || ',' || excluded.mode END")

    def _context_keys(self) -> tuple[str, str]:
        return "k.key", "signals, json_each(signals.context) AS k"

    def _context_value(self, key: str) -> tuple[str, list[Any]]:
        path = _path(key)
        return ("(CASE json_type(context, ?) WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' "
                "WHEN 'null' THEN NULL ELSE CAST(json_extract(context, ?) AS TEXT) END)",
                [path, path])

    def _context_match(self, key: str, value: str) -> tuple[str, list[Any]]:
        return ("EXISTS (SELECT 1 FROM json_each(signals.context, ?) AS e WHERE (CASE e.type "
                "WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' "
                "ELSE CAST(e.value AS TEXT) END) = ?)", [_path(key), value])

    def _json(self, value: Any) -> Any:
        return json.loads(value)


def _path(key: str) -> str:
    """A JSON path naming one top-level key, dots and all (`$."service.version"`)."""
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _statements(sql: str) -> list[str]:
    """A migration file split into whole statements (sqlite3 runs one per execute)."""
    out, pending = [], ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip() and not all(part.strip().startswith("--") or not part.strip()
                                   for part in pending.splitlines()):
        out.append(pending.strip())
    return out


class _Begun:
    """A connection that begins a transaction at the first cursor and ends it at commit or
    rollback (the driver itself stays in autocommit, so migrations control theirs)."""

    def __init__(self, raw: sqlite3.Connection, optimize: bool) -> None:
        self.raw, self.optimize = raw, optimize

    def cursor(self) -> sqlite3.Cursor:
        self.raw.execute("BEGIN")
        return self.raw.cursor()

    def commit(self) -> None:
        if self.raw.in_transaction:
            self.raw.execute("COMMIT")

    def rollback(self) -> None:
        if self.raw.in_transaction:
            self.raw.execute("ROLLBACK")

    def close(self) -> None:
        try:
            if self.optimize:
                self.raw.execute("PRAGMA optimize")  # (SQLite's advice: keeps planner stats)
        finally:
            self.raw.close()

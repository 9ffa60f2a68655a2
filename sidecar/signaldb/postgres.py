"""PostgreSQL (psycopg 3): one signal database for a fleet of sidecars and a central
investigation. The password comes from the URL's environment (PGPASSWORD, ~/.pgpass, as
libpq reads them) or a file given apart from the URL; it is never logged."""

from __future__ import annotations

import json
import math
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from sidecar.signaldb.database import (
    FIELDS,
    TIMES,
    SignalDB,
)

_LOCK = 0x6265747261636500  # pg_advisory_xact_lock key while migrating ("betrace\0")
_CONNECT_TIMEOUT = 5  # seconds


class PostgresSignalDB(SignalDB):
    dialect = "postgresql"
    placeholder = "%s"
    errors = (psycopg.Error,)

    def __init__(self, url: str, password: str | None = None, read_only: bool = False) -> None:
        params = conninfo_to_dict(url)  # raises ProgrammingError on a malformed URL
        shown = {k: v for k, v in params.items() if k != "password"}
        super().__init__(f"postgresql://{shown.get('user', '')}@{shown.get('host', '')}:"
                         f"{shown.get('port', 5432)}/{shown.get('dbname', '')}", read_only)
        if password is not None:
            params["password"] = password
        params.setdefault("connect_timeout", _CONNECT_TIMEOUT)
        params.setdefault("application_name", "betrace")
        self._conninfo = make_conninfo(**params)

    def _connect(self) -> psycopg.Connection[Any]:
        connection = psycopg.connect(self._conninfo)
        connection.read_only = self.read_only  # every transaction READ ONLY: the server refuses
        return connection

    def _migrate(self, connection: Any) -> None:
        with connection.transaction(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK])
            cursor.execute("CREATE TABLE IF NOT EXISTS betrace_schema "
                           "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL)")
            cursor.execute("SELECT max(version) FROM betrace_schema")
            for version, sql in self._pending(cursor.fetchone()[0]):
                cursor.execute(sql.encode())  # (bytes: no parameters, many statements)
                cursor.execute("INSERT INTO betrace_schema VALUES (%s, now())", [version])
        connection.commit()

    def _upsert_sql(self) -> str:
        values = ", ".join("%s::jsonb" if f in ("span_ids", "context") else
                           "%s::timestamptz" if f in TIMES else "%s" for f in FIELDS)
        return (f"INSERT INTO signals ({', '.join(FIELDS)}) VALUES ({values}) "
                "ON CONFLICT (signal_id) DO UPDATE SET "
                "mode = CASE WHEN EXCLUDED.detected_at < signals.detected_at "
                "THEN EXCLUDED.mode ELSE signals.mode END, "
                "detected_at = LEAST(signals.detected_at, EXCLUDED.detected_at), "
                "last_seen = GREATEST(signals.last_seen, EXCLUDED.last_seen), "
                "modes = CASE WHEN position(',' || EXCLUDED.mode || ',' in "
                "',' || signals.modes || ',') > 0 THEN signals.modes "
                "ELSE signals.modes || ',' || EXCLUDED.mode END")

    def _context_keys(self) -> tuple[str, str]:
        return "jsonb_object_keys(context)", "signals"

    def _cursor(self, connection: Any, streaming: bool) -> Any:
        # a server-side cursor: libpq would otherwise hold every row in memory at once
        return connection.cursor(name="betrace_signals") if streaming else connection.cursor()

    def _context_value(self, key: str) -> tuple[str, list[Any]]:
        return "(context ->> %s)", [key]

    def _context_match(self, key: str, value: str) -> tuple[str, list[Any]]:
        # Containment of each JSON value whose text is `value` (the string; the number or
        # boolean it spells), alone or in a list: the GIN index on context answers it.
        candidates: list[Any] = [value]
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, (bool, int, float)) and math.isfinite(parsed):
            candidates.append(parsed)  # 42, 1.5, true, false
        shapes = []
        for candidate in candidates:
            shapes += [json.dumps({key: candidate}), json.dumps({key: [candidate]})]
        return "(" + " OR ".join(["context @> %s::jsonb"] * len(shapes)) + ")", shapes

    def _time(self, column: str) -> str:
        return (f"to_char({column} AT TIME ZONE 'UTC', "
                "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")

    def _day(self, column: str) -> str:
        return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def _time_param(self) -> str:
        return "%s::timestamptz"

    def _json(self, value: Any) -> Any:
        return value  # psycopg loads jsonb itself

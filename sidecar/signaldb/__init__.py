"""The signal database: every signal kept by its id, queryable by time, rule, severity, service
and context (SQLite or PostgreSQL), and the writer that feeds it. Imports only `model`."""

from __future__ import annotations

from pathlib import Path

from sidecar.signaldb.database import IncompatibleSchema, SignalDB, SignalDBError
from sidecar.signaldb.query import COLUMNS, Group, SignalQuery, StoredSignal

__all__ = ["COLUMNS", "Group", "IncompatibleSchema", "SignalDB", "SignalDBError",
           "SignalQuery", "StoredSignal", "open_signal_db", "read_password"]

SCHEMES = "sqlite:///PATH (sqlite:////ABSOLUTE/PATH) or postgresql://USER@HOST:PORT/DB"


def open_signal_db(url: str, password: str | None = None, read_only: bool = False) -> SignalDB:
    """The database `url` names, not yet connected (`connect()` connects and migrates, or with
    `read_only` only checks the schema and never writes). Raises ValueError naming what is
    wrong with the URL."""
    if url.startswith("sqlite:///"):
        from sidecar.signaldb.sqlite import SqliteSignalDB
        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError(f"signal database URL {url!r} names no file: expected {SCHEMES}")
        return SqliteSignalDB(path, read_only)
    if url.startswith(("postgresql://", "postgres://")):
        from sidecar.signaldb.postgres import PostgresSignalDB
        try:
            return PostgresSignalDB(url, password, read_only)
        except Exception as exc:  # psycopg's ProgrammingError, without the URL's password
            raise ValueError(f"signal database URL is not a valid PostgreSQL URL: "
                             f"{str(exc).splitlines()[0]}") from None
    scheme = url.split("://", 1)[0] if "://" in url else url
    raise ValueError(f"signal database URL scheme {scheme!r} unknown: expected {SCHEMES}")


def read_password(path: str) -> str:
    """A password file's content without its trailing newline (as Kubernetes Secrets mount
    it); raises SignalDBError naming the file, never showing its content."""
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SignalDBError(f"cannot read the signal database password file {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None

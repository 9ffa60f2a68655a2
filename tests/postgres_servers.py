"""A real PostgreSQL server for the tests: Debian's `postgresql` package (`.ci/run` installs
it), a throw-away data directory, loopback only, password authentication over TCP (so the
tests exercise the password paths for real). As root it runs as the `postgres` user, since
PostgreSQL refuses to run as root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from processes import free_port, missing, stop

USER, PASSWORD = "betrace", "s3cret-for-tests"


def binaries() -> Path | None:
    """The folder holding initdb and postgres: on PATH, else Debian's versioned folder."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(folders[-1]).parent if folders else None


class PostgresServer:
    def __init__(self) -> None:
        folder = binaries()
        if folder is None:
            missing("PostgreSQL (initdb)", "postgresql")
        self.bin = folder
        self.dir = Path(tempfile.mkdtemp(prefix="betrace-pg-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.user = None if os.getuid() != 0 else pwd.getpwnam("postgres")

    def _as_postgres(self) -> dict[str, Any]:
        """Popen arguments running a program as the postgres user when we are root."""
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def start(self) -> PostgresServer:
        """Start it (the first time: make its data directory); returns once it answers."""
        data, log = self.dir / "data", self.dir / "server.log"
        if not data.exists():
            (self.dir / "pw").write_text(PASSWORD)
            if self.user is not None:
                os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
                os.chown(self.dir / "pw", self.user.pw_uid, self.user.pw_gid)
            subprocess.run([str(self.bin / "initdb"), "-D", str(data), "-U", USER,
                            "--pwfile", str(self.dir / "pw"), "--auth-host=scram-sha-256",
                            "--auth-local=trust", "-E", "UTF8", "--no-sync"],
                           check=True, capture_output=True, timeout=120, cwd=self.dir,
                           **self._as_postgres())
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                 "-c", "fsync=off", "-c", "full_page_writes=off",
                 "-c", "synchronous_commit=off"],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.dir, **self._as_postgres())
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.conninfo("postgres"), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)

    def url(self, database: str = "postgres") -> str:
        """A URL without the password (the tests pass it apart, as a deployment should)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} password={PASSWORD} dbname={database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.conninfo(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are disconnected, the data stays consistent (the
        default SIGTERM would wait for every client to leave)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                stop(self.process)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

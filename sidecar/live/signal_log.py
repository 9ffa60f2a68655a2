"""The signal log file: one JSON line per signal, appended, each line whole or not at all.

A line the disk refuses (full, over quota, an I/O error) waits in memory and is written first
when the next signal comes or `retry` is called (the readiness probe does, every few seconds):
lines are delayed, never reordered or cut. Beyond `backlog` waiting lines the oldest is dropped
and counted; what still waits when the sidecar stops is counted too.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable

from sidecar.model.signals import Signal

log = logging.getLogger(__name__)

BACKLOG = 10_000


class SignalLog:
    def __init__(self, path: str, lost: Callable[[int], object], backlog: int = BACKLOG) -> None:
        self.path, self.lost, self.backlog_limit = path, lost, backlog
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self._waiting: deque[bytes] = deque()
        self._lock = threading.Lock()
        self.error: str | None = None  # why the last write failed, until one succeeds

    def write(self, signal: Signal) -> None:
        line = (json.dumps(signal.as_dict(), ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            if len(self._waiting) >= self.backlog_limit:
                self._waiting.popleft()
                self.lost(1)
            self._waiting.append(line)
            self._drain()

    def retry(self) -> None:
        """Write what waits, if the disk takes it now."""
        with self._lock:
            self._drain()

    def backlog(self) -> int:
        return len(self._waiting)

    def healthy(self) -> tuple[bool, str]:
        self.retry()
        if self.error is None:
            return True, "signal log ok"
        return False, f"signal log {self.path} failing ({self.error}): " \
                      f"{len(self._waiting)} line(s) waiting"

    def _drain(self) -> None:
        waiting = self._waiting
        while waiting:
            line = waiting[0]
            try:
                written = self._file.write(line)
            except OSError as exc:
                if self.error is None:
                    log.error("cannot write the signal log %s: %s; signals wait in memory "
                              "(up to %d) and are written once it can be", self.path,
                              exc.strerror or exc, self.backlog_limit)
                self.error = exc.strerror or str(exc)
                return
            if written < len(line):  # the rest of the line when the disk takes more
                waiting[0] = line[written:]
            else:
                waiting.popleft()
        if self.error is not None:
            log.info("signal log %s writable again", self.path)
            self.error = None

    def close(self) -> None:
        with self._lock:
            self._drain()
            if self._waiting:
                self.lost(len(self._waiting))
                log.error("%d signal(s) could not be written to %s before stopping (%s)",
                          len(self._waiting), self.path, self.error)
                self._waiting.clear()
            try:
                self._file.close()
            except OSError as exc:
                log.error("closing the signal log %s: %s", self.path, exc)

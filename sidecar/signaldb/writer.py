"""Signals into the database: `SignalDBSink` for a replay (in batches; an error stops it), and
`Retention`, which prunes what is older than the retention in the background. The sidecar's
writes go through a `routing.Dispatcher` around `SignalDB.upsert`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sidecar.model.signals import Signal, rfc3339
from sidecar.signaldb.database import PRUNE_BATCH, SignalDB, SignalDBError

log = logging.getLogger(__name__)

BATCH = 500  # signals per transaction
PRUNE_EVERY = 600.0  # seconds between retention passes


class SignalDBSink:
    """A replay's signals into the database, `BATCH` per transaction; a database error is
    raised (a replay reports it and fails rather than store half of its findings silently)."""

    def __init__(self, db: SignalDB, batch: int = BATCH) -> None:
        self.db, self.batch = db, batch
        self._pending: list[Signal] = []
        self.stored = 0
        db.connect()

    def write(self, signal: Signal) -> None:
        self._pending.append(signal)
        if len(self._pending) >= self.batch:
            self._flush()

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self.db.close()

    def _flush(self) -> None:
        self.db.upsert(self._pending)
        self.stored += len(self._pending)
        self._pending = []


class Retention:
    """Deletes signals that occurred more than `seconds` ago, every `every` seconds, a bounded
    batch per transaction, on its own connection (`db` is used by this thread alone)."""

    def __init__(self, db: SignalDB, seconds: float, every: float = PRUNE_EVERY,
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.seconds, self.every, self.clock = db, seconds, every, clock

    def run(self, stop: threading.Event) -> None:
        while True:
            self.prune(stop)
            if stop.wait(self.every):
                self.db.close()
                return

    def prune(self, stop: threading.Event) -> int:
        before = rfc3339(int((self.clock() - self.seconds) * 1e9))
        deleted = 0
        try:
            while not stop.is_set():
                count = self.db.prune(before)
                deleted += count
                if count < PRUNE_BATCH:
                    break
        except SignalDBError as exc:
            log.warning("retention: %s (tried again in %.0fs)", exc, self.every)
        if deleted:
            log.info("retention: deleted %d signal(s) that occurred before %s", deleted, before)
        return deleted

"""One receiver's queue: signals taken without waiting, delivered in batches by one thread,
retried with backoff while the receiver fails, and counted whatever becomes of them."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from sidecar.model.signals import Signal

log = logging.getLogger(__name__)

QUEUE = 100_000  # signals waiting for one receiver (about 1 KB each)
BATCH = 500  # signals per delivery
BACKOFF = (0.5, 30.0)  # first and longest wait between attempts while the receiver fails


class Rejected(Exception):
    """The receiver refused the batch for good (an HTTP 4xx, say): it is dropped, counted and
    logged, never retried."""


class Dispatcher:
    """`submit` never waits. While `deliver` raises one of `retryable`, the batch in hand is
    retried with backoff and new signals queue up to `max_queue`; beyond it they are dropped
    and counted (reason queue_full; the signal log, when configured, still has them). A
    `Rejected` batch is dropped (rejected); any other exception is a bug, logged with its
    stack (error). What is still queued when `close`'s grace runs out is counted (shutdown).
    Nothing is lost silently."""

    def __init__(self, name: str, deliver: Callable[[Sequence[Signal]], None],
                 retryable: tuple[type[BaseException], ...], *,
                 delivered: Callable[[int], object], dropped: Callable[[str, int], object],
                 failed: Callable[[], object], max_queue: int = QUEUE, batch: int = BATCH,
                 backoff: tuple[float, float] = BACKOFF) -> None:
        self.name, self.deliver, self.retryable = name, deliver, retryable
        self.batch, self.backoff = batch, backoff
        self._delivered, self._dropped, self._failed = delivered, dropped, failed
        self._queue: queue.Queue[Signal] = queue.Queue(max_queue)
        self._in_hand = 0  # taken from the queue, not yet delivered
        self._stop = threading.Event()
        self._deadline = float("inf")  # once closing: give up retrying at this time
        self.error: str | None = None  # why the last attempt failed, until one succeeds
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, signal: Signal) -> None:
        try:
            self._queue.put_nowait(signal)
        except queue.Full:
            self._dropped("queue_full", 1)

    def backlog(self) -> int:
        return self._queue.qsize() + self._in_hand

    def close(self, grace: float = 10.0) -> None:
        """Deliver what is queued, retrying for at most `grace` seconds; count the rest."""
        self._deadline = time.monotonic() + grace
        self._stop.set()
        self._thread.join(grace + 5.0)
        left = self.backlog()
        if left:
            self._dropped("shutdown", left)
            log.error("%s: %d signal(s) not delivered at shutdown (%s)", self.name, left,
                      self.error or "timed out")

    def _run(self) -> None:
        while True:
            signals = self._take()
            if not signals:
                if self._stop.is_set():
                    return
                continue
            if not self._send(signals):
                return  # closing, and the receiver did not come back within the grace

    def _take(self) -> list[Signal]:
        """Up to `batch` signals: waits a little for the first, never for the rest."""
        try:
            signals = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(signals) < self.batch:
            try:
                signals.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._in_hand = len(signals)
        return signals

    def _send(self, signals: list[Signal]) -> bool:
        """Deliver one batch, retrying while the receiver fails; False once closing gave up."""
        wait = self.backoff[0]
        while True:
            try:
                self.deliver(signals)
            except self.retryable as exc:
                self._failed()
                if self.error is None:
                    log.error("%s: %s; signals wait (up to %d queued) and are retried",
                              self.name, exc, self._queue.maxsize)
                self.error = str(exc)
            except Rejected as exc:
                log.error("%s: %d signal(s) refused: %s", self.name, len(signals), exc)
                return self._done(signals, "rejected")
            except Exception:  # a bug: loud, counted, and not retried for ever
                log.exception("%s: cannot deliver %d signal(s)", self.name, len(signals))
                return self._done(signals, "error")
            else:
                if self.error is not None:
                    log.info("%s: reachable again", self.name)
                    self.error = None
                return self._done(signals, None)
            if time.monotonic() + wait > self._deadline:
                return False
            if self._stop.is_set():
                time.sleep(wait)  # (closing: retry until the grace runs out)
            else:
                self._stop.wait(wait)
            wait = min(wait * 2, self.backoff[1])

    def _done(self, signals: list[Signal], dropped: str | None) -> bool:
        if dropped is None:
            self._delivered(len(signals))
        else:
            self._dropped(dropped, len(signals))
        self._in_hand = 0
        return True

"""Replay progress on stderr: one line redrawn in place on a terminal (spans/s and an ETA from the
bytes read), or a plain line every few seconds otherwise, so a CI log gets a heartbeat and a
short run prints nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

MODES = ("auto", "bar", "lines", "never")
_REDRAW_SECONDS, _LINE_SECONDS = 0.2, 5.0


class Progress:
    def __init__(self, mode: str = "auto", total_bytes: int = 0, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = sys.stderr if stream is None else stream
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        if mode not in MODES:
            raise ValueError(f"progress must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode, self.total, self.clock = mode, total_bytes, clock
        self.started = clock()
        self.next_at = self.started + (0 if mode == "bar" else _LINE_SECONDS)
        self.drawn = False

    def due(self) -> bool:
        """Whether a call now would print: callers skip gathering figures when it would not."""
        return self.mode != "never" and self.clock() >= self.next_at

    def reading(self, bytes_read: int, spans: int) -> None:
        if not self.due():
            return
        elapsed = max(self.clock() - self.started, 1e-9)
        text = f"read {spans:,} spans kept ({spans / elapsed:,.0f} spans/s)"
        if self.total:
            done = min(bytes_read / self.total, 1.0)
            text += f", {done:.0%} of {_size(self.total)}"
            if done > 0:
                text += f", ETA {_duration(elapsed * (1 - done) / done)}"
        self._show(text)

    def evaluating(self, done: int, partitions: int) -> None:
        if self.due():
            self._show(f"evaluating: {done} of {partitions} partition(s) done")

    def clear(self) -> None:
        """Erase the redrawn line, before other output."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def _show(self, text: str) -> None:
        if self.mode == "bar":
            self.stream.write(f"\r\x1b[Kbetrace: {text}")
            self.drawn = True
            self.next_at = self.clock() + _REDRAW_SECONDS
        else:
            self.stream.write(f"betrace: {text}\n")
            self.next_at = self.clock() + _LINE_SECONDS
        self.stream.flush()


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return f"{count:.1f} TiB"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"

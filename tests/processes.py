"""Stopping the processes tests start: politely first, then for sure; and closing every one a
fixture started when its test ends."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


def closed_at_end(make: Callable[..., C]) -> Iterator[Callable[..., C]]:
    """For a fixture to `yield from`: `make` as the test's factory, and everything it made
    closed, in order, when the test ends (passed or not)."""
    started: list[C] = []

    def start(*args: object, **kwargs: object) -> C:
        made = make(*args, **kwargs)
        started.append(made)
        return made

    try:
        yield start
    finally:
        for made in started:
            made.close()


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM, wait `grace` seconds, then SIGKILL; a process already gone is left alone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)

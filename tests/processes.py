"""The processes tests start: a free port to tell one, stopping it politely first and then for
sure, and closing every one a fixture started when its test ends."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar


def free_port(below: int = 65536) -> int:
    """A loopback TCP port free a moment ago (bound to port 0, then closed), for a process that
    must be told its port up front; `below` leaves room for a Redis cluster bus at port+10000."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < below:
            return port


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

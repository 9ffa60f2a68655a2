"""The processes tests start: a free port to tell one, stopping it politely first and then for
sure, and closing every one a fixture started when its test ends."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

import pytest


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_PORTS = range(10000, max(20000, _ephemeral_low()))  # (a Redis cluster bus at +10000 fits)
_given: set[int] = set()


def free_port() -> int:
    """A loopback TCP port free a moment ago, for a process that must be told its port up
    front. Below the ephemeral range: a port the kernel hands out (bind to port 0) may be taken
    as the source port of some outgoing connection before the process binds it, which made a
    sidecar fail to listen now and then. Never the same port twice in one test run."""
    while True:
        port = random.choice(_PORTS)
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
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


def missing(what: str, package: str) -> NoReturn:
    """A server the tests start is not installed: a failure in CI (`.ci/run` installs Debian's
    `package`), a skip elsewhere."""
    message = f"{what} not found: apt-get install {package} (.ci/run does)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


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


def fuzz_sanitized(source: Path, script: str, tmp_path: Path) -> None:
    """Build the C extension `source` with AddressSanitizer and UBSan into `tmp_path` and run
    `script` there (it imports the build by its module name from sys.argv[1] and prints "clean"
    at its end). Python's own allocator is switched off (PYTHONMALLOC=malloc): a bytes object
    inside one of its arenas has no bounds ASan sees. An allocation past 256 MiB fails (a
    MemoryError) instead of being made: damaged input claiming a huge container (marshal's
    tuples: 16 GiB, zeroed) would otherwise have the kernel kill the run without a word."""
    library = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, timeout=30)
    if library.returncode != 0 or not Path(library.stdout.strip()).is_absolute():
        missing("gcc's AddressSanitizer runtime", "gcc")
    built = tmp_path / (source.stem + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(built)],
                   check=True, timeout=120)
    fuzz = tmp_path / "fuzz.py"
    fuzz.write_text(script)
    env = {**os.environ, "LD_PRELOAD": library.stdout.strip(), "PYTHONMALLOC": "malloc",
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:allocator_may_return_null=1:"
                           "max_allocation_size_mb=256"}
    result = subprocess.run([sys.executable, str(fuzz), str(tmp_path),
                             str(Path(__file__).resolve().parent)], capture_output=True,
                            text=True, timeout=110, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "clean"

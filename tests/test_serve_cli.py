"""`betrace serve` as an operator runs it: a real subprocess (`python -m sidecar serve`) on free
loopback ports, fed by the real OpenTelemetry SDK exporter, stopped with real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import closed_at_end, stop

REPO = Path(__file__).resolve().parent.parent

RULES = """
rules:
  - id: double-charge
    name: Payment charged more than once
    severity: critical
    condition: count(payment.charge) > 1
    signal:
      context: [order_id]
  - id: admin-audit
    name: Admin action must be audited
    severity: high
    when: trace.has(admin.action)
    always: trace.has(audit.log)
"""

NEW_RULES = """
rules:
  - id: refund-seen
    name: A refund was issued
    severity: info
    condition: count(refund.issued) > 0
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
    env.update(extra)
    return env


class Serve:
    """A running `betrace serve`; stderr is collected line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", *args], cwd=REPO, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="serve-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def mark(self) -> int:
        """How many lines have been read so far (for `wait_for_line(after=...)`)."""
        return len(self.lines)

    def wait_for_line(self, text: str, timeout: float = 15.0, after: int = 0) -> str:
        """The first stderr line from line `after` on that contains `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.lines[after:] if text in line), None)
            if found is not None:
                return found
            if self.process.poll() is not None:
                self._reader.join(2)
                found = next((line for line in self.lines[after:] if text in line), None)
                if found is not None:
                    return found
                raise AssertionError(f"betrace serve exited ({self.process.returncode}) "
                                     f"before printing {text!r}:\n{self.stderr}")
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} on stderr within {timeout}s:\n{self.stderr}")

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        stop(self.process)
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Serve]]:
    """`serve(*args, env=None)`: start `betrace serve` with these arguments; killed (if still
    running) at the end of the test."""
    def start(*args: str, env: dict[str, str] | None = None) -> Serve:
        return Serve(list(args), env if env is not None else clean_env())

    yield from closed_at_end(start)


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def read_signals(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def http_get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, response.read().decode()


def run_serve(args: list[str], env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """Run `betrace serve` expecting it to give up at once (bounded by a timeout)."""
    return subprocess.run([sys.executable, "-m", "sidecar", "serve", *args], cwd=REPO,
                          env=env if env is not None else clean_env(), capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


# --- start, serve, SIGTERM ----------------------------------------------------------------------

def test_serve_reports_what_it_listens_on_and_decides_buffered_traces_on_sigterm(
        serve: Callable[..., Serve], rules_file: Path, tmp_path: Path,
        free_port: Callable[[], int], sdk_client: Callable[..., Any]) -> None:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    signals = tmp_path / "signals.jsonl"
    process = serve("--rules", str(rules_file), "--listen", f"127.0.0.1:{grpc_port}",
                    "--http-listen", f"127.0.0.1:{http_port}",
                    "--metrics-listen", f"127.0.0.1:{metrics_port}",
                    "--decision-wait", "30s", "--signals-out", str(signals))
    line = process.wait_for_line("betrace listening")
    assert f"OTLP gRPC 127.0.0.1:{grpc_port}" in line
    assert f"OTLP/HTTP 127.0.0.1:{http_port}" in line
    assert f"http://127.0.0.1:{metrics_port}/metrics" in line
    assert "2 rule(s) loaded" in line
    assert "decision wait 30s" in line
    assert http_get(metrics_port, "/readyz") == (200, "ready: 2 rules, memory store\n")

    # A when/always violation: nothing can signal it before the trace is decided.
    tracer = sdk_client(grpc_port).tracer
    with tracer.start_as_current_span("admin.action") as admin:
        pass  # exported and acknowledged when the span ends
    trace_id = format(admin.get_span_context().trace_id, "032x")
    assert read_signals(signals) == []

    process.send(signal.SIGTERM)
    assert process.wait() == 0, process.stderr
    [found] = read_signals(signals)
    assert (found["rule_id"], found["trace_id"], found["mode"]) == ("admin-audit", trace_id,
                                                                    "live")
    assert "decided 1 buffered trace(s)" in process.stderr
    assert "Traceback" not in process.stderr


def test_sighup_reloads_changed_rules(
        serve: Callable[..., Serve], rules_file: Path, tmp_path: Path,
        free_port: Callable[[], int], sdk_client: Callable[..., Any]) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    signals = tmp_path / "signals.jsonl"
    process = serve("--rules", str(rules_file), "--listen", f"127.0.0.1:{grpc_port}",
                    "--http-listen", "", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                    "--reload-interval", "1h",  # only SIGHUP can make it look
                    "--decision-wait", "200ms", "--signals-out", str(signals))
    process.wait_for_line("betrace listening")

    rules_file.write_text(NEW_RULES)
    process.send(signal.SIGHUP)
    line = process.wait_for_line("rules reloaded", after=process.mark())
    assert "1 enabled rule(s)" in line
    tracer = sdk_client(grpc_port).tracer
    with tracer.start_as_current_span("refund.issued") as refund:
        pass
    trace_id = format(refund.get_span_context().trace_id, "032x")
    deadline = time.monotonic() + 5
    while not read_signals(signals) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(s["rule_id"], s["trace_id"]) for s in read_signals(signals)] == [
        ("refund-seen", trace_id)]

    # A broken file on SIGHUP: an error that says where, and the process keeps serving.
    rules_file.write_text(NEW_RULES.replace("> 0", "> > 0"))
    before = process.mark()
    process.send(signal.SIGHUP)
    process.wait_for_line("rule reload failed", after=before)
    process.wait_for_line(f"{rules_file}:6:", after=before)  # file:line:column of the error
    assert process.process.poll() is None
    assert http_get(metrics_port, "/readyz") == (200, "ready: 1 rules, memory store\n")

    process.send(signal.SIGTERM)
    assert process.wait() == 0, process.stderr


def test_a_rule_the_parser_chokes_on_is_refused_and_later_reloads_still_happen(
        serve: Callable[..., Serve], rules_file: Path, free_port: Callable[[], int]) -> None:
    """A 5,000-digit literal once killed the reload thread (a lark VisitError, not a rule
    error): later good rules and SIGHUP were ignored while betrace_rules_current said 1."""
    grpc_port, metrics_port = free_port(), free_port()
    process = serve("--rules", str(rules_file), "--listen", f"127.0.0.1:{grpc_port}",
                    "--http-listen", "", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                    "--reload-interval", "1h")
    process.wait_for_line("betrace listening")

    rules_file.write_text(NEW_RULES.replace("> 0", "> " + "9" * 5000))
    before = process.mark()
    process.send(signal.SIGHUP)
    process.wait_for_line("rule reload failed", after=before)
    process.wait_for_line(f"{rules_file}:6:", after=before)
    metrics = http_get(metrics_port, "/metrics")[1]
    assert "betrace_rules_current 0.0" in metrics

    rules_file.write_text(NEW_RULES)
    before = process.mark()
    process.send(signal.SIGHUP)
    assert "1 enabled rule(s)" in process.wait_for_line("rules reloaded", after=before)
    metrics = http_get(metrics_port, "/metrics")[1]
    assert "betrace_rules_current 1.0" in metrics
    checked = float(metrics.split("\nbetrace_rule_reload_last_check_timestamp_seconds ")[1]
                    .split()[0])
    assert abs(checked - time.time()) < 60

    process.send(signal.SIGTERM)
    assert process.wait() == 0, process.stderr
    assert "Traceback" not in process.stderr


def test_the_log_lists_the_rules_at_start_and_reload_and_says_when_they_are_good_again(
        serve: Callable[..., Serve], rules_file: Path, free_port: Callable[[], int]) -> None:
    process = serve("--rules", str(rules_file), "--listen", f"127.0.0.1:{free_port()}",
                    "--http-listen", "", "--metrics-listen", "", "--reload-interval", "1h")
    process.wait_for_line("betrace listening")
    assert process.wait_for_line(" INFO sidecar.live.reload: rule double-charge ").endswith(
        f"severity=critical enabled=yes form=condition on_arrival=yes "
        f"fires_without_its_spans=no at={rules_file}:3 reads=payment.charge")
    assert "form=when+always on_arrival=no " in process.wait_for_line(": rule admin-audit ")

    rules_file.write_text(NEW_RULES.replace("> 0", "> > 0"))
    before = process.mark()
    process.send(signal.SIGHUP)
    process.wait_for_line("rule reload failed", after=before)
    rules_file.write_text(NEW_RULES)
    before = process.mark()
    process.send(signal.SIGHUP)
    good = process.wait_for_line("rules are good again", after=before)
    assert " INFO " in good and "after 1 failed reload(s), failing since 20" in good
    process.wait_for_line("rules reloaded", after=before)
    process.wait_for_line(": rule refund-seen severity=info enabled=yes ", after=before)
    assert ": rule double-charge " not in "\n".join(process.lines[before:])

    process.send(signal.SIGTERM)
    assert process.wait() == 0, process.stderr


# --- settings from the environment --------------------------------------------------------------

def test_betrace_environment_variables_are_honoured_and_flags_win(
        serve: Callable[..., Serve], rules_file: Path, tmp_path: Path,
        free_port: Callable[[], int], sdk_client: Callable[..., Any]) -> None:
    env_grpc, flag_grpc, metrics_port = free_port(), free_port(), free_port()
    signals = tmp_path / "from-env.jsonl"
    env = clean_env(
        BETRACE_RULES=str(rules_file),
        BETRACE_LISTEN=f"127.0.0.1:{env_grpc}",
        BETRACE_HTTP_LISTEN="",  # off
        BETRACE_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        BETRACE_DECISION_WAIT="45s",
        BETRACE_SIGNALS_OUT=str(signals),
    )
    process = serve("--listen", f"127.0.0.1:{flag_grpc}", env=env)
    line = process.wait_for_line("betrace listening")
    assert f"OTLP gRPC 127.0.0.1:{flag_grpc}" in line  # the flag beat BETRACE_LISTEN
    assert str(env_grpc) not in line
    assert "OTLP/HTTP" not in line  # turned off by BETRACE_HTTP_LISTEN=""
    assert f"http://127.0.0.1:{metrics_port}/metrics" in line
    assert "decision wait 45s" in line
    assert "2 rule(s) loaded" in line
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")

    tracer = sdk_client(flag_grpc).tracer
    with tracer.start_as_current_span("checkout") as root:
        for _ in range(2):
            with tracer.start_as_current_span("payment.charge", attributes={"order_id": "o-9"}):
                pass
    trace_id = format(root.get_span_context().trace_id, "032x")
    deadline = time.monotonic() + 5  # an early signal: far sooner than the 45s wait
    while not read_signals(signals) and time.monotonic() < deadline:
        time.sleep(0.02)
    [found] = read_signals(signals)
    assert (found["rule_id"], found["trace_id"]) == ("double-charge", trace_id)
    assert found["context"] == {"order_id": "o-9"}

    process.send(signal.SIGTERM)
    assert process.wait() == 0, process.stderr


# --- refusing to start --------------------------------------------------------------------------

def _bad(args: list[str], message: str, **env: str) -> Any:
    label = " ".join(args) or " ".join(f"{k}={v}" for k, v in env.items())
    return pytest.param(args, env, message, id=label)


@pytest.mark.parametrize("args, env, message", [
    _bad(["--decision-wait", "10parsecs"], "invalid duration '10parsecs'"),
    _bad(["--listen", "nonsense"], "listen: 'nonsense' is not HOST:PORT"),
    _bad(["--metrics-listen", "127.0.0.1:99999"], "metrics-listen: '127.0.0.1:99999'"),
    _bad(["--max-traces", "many"], "'many'"),
    _bad(["--max-traces", "0"], "max-traces must be at least 1"),
    _bad(["--max-trace-bytes", "16 pages"], "invalid --max-trace-bytes '16 pages'"),
    _bad(["--max-trace-bytes", "0"], "invalid --max-trace-bytes '0'"),
    _bad(["--decision-wait", "0s"], "decision-wait must be positive"),
    _bad(["--decision-wait", "10s", "--max-trace-age", "1s"],
         "max-trace-age must be at least decision-wait"),
    _bad(["--log-level", "loud"], "log-level 'loud'"),
    _bad(["--frobnicate"], "unrecognized arguments: --frobnicate"),
    _bad([], "invalid duration 'soon'", BETRACE_DECISION_WAIT="soon"),
    _bad(["--rules", "/nonexistent/rules.yaml"], "no such file or directory"),
])
def test_bad_settings_exit_2_with_a_clear_message(
        rules_file: Path, free_port: Callable[[], int], args: list[str],
        env: dict[str, str], message: str) -> None:
    ports = ["--listen", f"127.0.0.1:{free_port()}", "--http-listen", "",
             "--metrics-listen", f"127.0.0.1:{free_port()}"]
    result = run_serve(["--rules", str(rules_file), *ports, *args], clean_env(**env))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("which", ["--listen", "--metrics-listen"])
def test_a_port_already_in_use_exits_2_with_a_clear_message(
        rules_file: Path, free_port: Callable[[], int], which: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listeners = {"--listen": f"127.0.0.1:{free_port()}", "--http-listen": "",
                     "--metrics-listen": f"127.0.0.1:{free_port()}"}
        listeners[which] = f"127.0.0.1:{port}"
        args = [part for flag, value in listeners.items() for part in (flag, value)]
        started = time.monotonic()
        result = run_serve(["--rules", str(rules_file), *args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "betrace serve:" in result.stderr
    assert "in use" in result.stderr
    assert time.monotonic() - started < 20

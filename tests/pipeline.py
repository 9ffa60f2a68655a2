"""The real pipeline as processes on loopback: the chart's collector pod (the OpenTelemetry
Collector and the BeTrace sidecar, run from what helm/betrace renders, with only their endpoints
moved to free loopback ports) and Jaeger as the trace store, both built by deploy/build.sh.

The chart's endpoints are moved by name, each checked to be what the chart says, so a change in
the chart fails here instead of the test quietly running something else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from chart import REPO, Rendered, container_env, flag
from otelcol import built
from processes import free_port, stop


class Process:
    """A program started by a test; its output goes to `log` (stdout to `stdout` if given),
    shown when something fails."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None,
                 stdout: Path | None = None) -> None:
        self.args, self.log, self.env, self.stdout = args, log, env, stdout
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            out = self.stdout.open("ab") if self.stdout else log
            with out:
                return subprocess.Popen(self.args, cwd=REPO, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT if out is log else log)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")[-20000:]

    def wait_http_ok(self, url: str, timeout: float = 30.0) -> str:
        """The body of the first 200 from `url`; fails with the output if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited ({self.process.returncode}):\n"
                                     f"{self.output}")
            status, body = http_get(url)
            if status == 200:
                return body
            time.sleep(0.1)
        raise AssertionError(f"no 200 from {url} within {timeout}s:\n{self.output}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing flushed."""
        self.process.kill()
        self.process.wait(10)

    def restart(self) -> None:
        stop(self.process)
        self.process = self._spawn()

    def close(self) -> None:
        stop(self.process)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode(errors="replace")
    except OSError:
        return 0, ""


def _move(tree: dict[str, Any], path: str, chart_value: object, value: object) -> None:
    """Set the dotted `path` (keys may hold '/': exporter names) to `value`, after checking the
    chart put `chart_value` there."""
    *parents, last = path.split(".")
    node = tree
    for key in parents:
        node = node[key]
    assert node.get(last) == chart_value, f"the chart's {path} is {node.get(last)!r}, " \
                                          f"expected {chart_value!r}: update tests/pipeline.py"
    node[last] = value


class ChartPod:
    """One collector pod as the chart renders it: `collector` and `sidecar` are Processes
    (started by `start(start_process)`), the sidecar's signal log (`--signals-out=-`, its stdout,
    one file across `sidecar.restart()`) is `signals()`. The pod IP is 127.0.0.1."""

    def __init__(self, rendered: Rendered, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.otlp_grpc, self.otlp_http, self.health, self.telemetry = (free_port()
                                                                       for _ in range(4))
        self.sidecar_grpc, self.sidecar_http, self.metrics = (free_port() for _ in range(3))

        config = rendered.collector_config()
        _move(config, "receivers.otlp.protocols.grpc.endpoint", "0.0.0.0:4317",
              f"127.0.0.1:{self.otlp_grpc}")
        _move(config, "receivers.otlp.protocols.http.endpoint", "0.0.0.0:4318",
              f"127.0.0.1:{self.otlp_http}")
        _move(config, "exporters.otlp_grpc/betrace.endpoint", "127.0.0.1:4319",
              f"127.0.0.1:{self.sidecar_grpc}")
        _move(config, "extensions.health_check.endpoint", "${env:MY_POD_IP}:13133",
              f"${{env:MY_POD_IP}}:{self.health}")
        [reader] = config["service"]["telemetry"]["metrics"]["readers"]
        _move(reader, "pull.exporter.prometheus.port", 8888, self.telemetry)
        self.config = directory / "otelcol.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.collector_env = {**os.environ, "MY_POD_IP": "127.0.0.1"}

        sidecar = rendered.sidecar()
        env = container_env(sidecar, {})
        args = [arg.replace("$(BETRACE_POD_IP)", env.get("BETRACE_POD_IP", "$(BETRACE_POD_IP)"))
                for arg in sidecar["args"]]
        rules = rendered.write_rules(directory / "rules")
        moves = {"rules": ("/etc/betrace/rules", str(rules)),
                 "listen": ("127.0.0.1:4319", f"127.0.0.1:{self.sidecar_grpc}"),
                 "metrics-listen": ("127.0.0.1:9464", f"127.0.0.1:{self.metrics}"),
                 "export-otlp": ("127.0.0.1:4317", f"127.0.0.1:{self.otlp_grpc}")}
        for name, (chart_value, value) in moves.items():
            assert flag(args, name) == chart_value, f"the chart's --{name} is " \
                f"{flag(args, name)!r}, expected {chart_value!r}: update tests/pipeline.py"
            args[args.index(f"--{name}={chart_value}")] = f"--{name}={value}"
        assert flag(args, "http-listen") is None  # the default, 127.0.0.1:4320, moved too:
        args.append(f"--http-listen=127.0.0.1:{self.sidecar_http}")
        assert flag(args, "signals-out") == "-", args
        self.sidecar_args = [sys.executable, "-m", "sidecar", *args]
        self.sidecar_env = {**{k: v for k, v in os.environ.items()
                               if not k.startswith("BETRACE_")}, **env}
        self.signal_log = directory / "signals.jsonl"

    def start(self, start_process: Callable[..., Process]) -> ChartPod:
        """Both containers, returned once the collector is healthy and the sidecar ready."""
        self.sidecar = start_process(self.sidecar_args, self.directory / "sidecar.log",
                                     self.sidecar_env, stdout=self.signal_log)
        self.collector = start_process([str(built("otelcol")), f"--config={self.config}"],
                                       self.directory / "otelcol.log", self.collector_env)
        self.collector.wait_http_ok(f"http://127.0.0.1:{self.health}/")
        self.wait_sidecar_ready()
        return self

    def wait_sidecar_ready(self, timeout: float = 30.0) -> None:
        """Until the sidecar's /readyz answers 200 (rules loaded, its store reachable): after
        `start`, a `sidecar.restart()` or a store outage."""
        self.sidecar.wait_http_ok(f"http://127.0.0.1:{self.metrics}/readyz", timeout)

    def signals(self) -> list[dict[str, Any]]:
        """The complete lines of the signal log (one being written is read next time)."""
        if not self.signal_log.exists():
            return []
        return [json.loads(line) for line in self.signal_log.read_text().split("\n")[:-1]
                if line.strip()]

    @property
    def logs(self) -> str:
        return f"collector:\n{self.collector.output}\nsidecar:\n{self.sidecar.output}"


class Jaeger:
    """Jaeger v1.75.0 (deploy/jaeger): OTLP in on `otlp_grpc` and `otlp_http`, in-memory
    storage, its query API on `query`."""

    def __init__(self, start_process: Callable[..., Process], directory: Path) -> None:
        ports = {name: free_port() for name in ("OTLP_GRPC", "OTLP_HTTP", "QUERY_HTTP",
                                                 "QUERY_GRPC")}
        self.otlp_grpc, self.otlp_http = ports["OTLP_GRPC"], ports["OTLP_HTTP"]
        self.query = f"http://127.0.0.1:{ports['QUERY_HTTP']}"
        env = {**os.environ, **{f"JAEGER_{k}_PORT": str(v) for k, v in ports.items()}}
        self.process = start_process(
            [str(built("jaeger")), "--config", str(REPO / "deploy" / "jaeger" / "config.yaml")],
            directory / "jaeger.log", env)
        self.process.wait_http_ok(f"{self.query}/api/v3/services")

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        """The trace's spans as Jaeger stores them (OTLP JSON from its api/v3), each with its
        resource's `service.name` added as `service`; [] when Jaeger has none. Raw: as stored,
        not adjusted for the UI (which would also rewrite the stored copy)."""
        status, body = http_get(f"{self.query}/api/v3/traces/{trace_id}?raw_traces=true")
        if status == 404:
            return []
        assert status == 200, (status, body)
        found = []
        for resource in json.loads(body)["result"]["resourceSpans"]:
            service = next(a["value"]["stringValue"] for a in resource["resource"]["attributes"]
                           if a["key"] == "service.name")
            for scope in resource["scopeSpans"]:
                found.extend({**span, "service": service} for span in scope["spans"])
        return found


def attributes(span: dict[str, Any]) -> dict[str, Any]:
    """An OTLP JSON span's attributes as {key: value} (scalars only, ints as JSON has them)."""
    return {a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])}

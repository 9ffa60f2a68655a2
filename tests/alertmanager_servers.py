"""A real Alertmanager for the tests (Debian's `prometheus-alertmanager`; `.ci/run` installs it)
on a loopback port, clustering off, and a small HTTP receiver that records what is POSTed to it
(the webhook receiver in alertmanager.yml, or BeTrace's own --webhook)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from processes import free_port, missing, stop


def binary() -> str | None:
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


class Receiver:
    """Records every POST (path, headers, JSON body); answers the next codes in `answers`
    (then 200)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code = receiver.answers.pop(0) if receiver.answers else 200
                if code == 200:
                    receiver.posts.append((self.path, dict(self.headers), body))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, path: str = "") -> list[Any]:
        return [json.loads(body) for p, _, body in list(self.posts) if p.startswith(path)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AlertmanagerServer:
    """`prometheus-alertmanager` with one route to a webhook receiver at `notify_url`,
    sending resolved notifications too, grouping by alertname, rule and service."""

    def __init__(self, notify_url: str, port: int | None = None) -> None:
        found = binary()
        if found is None:
            missing("Alertmanager", "prometheus-alertmanager")
        self.binary = found
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="betrace-am-"))
        (self.dir / "alertmanager.yml").write_text(f"""
route:
  receiver: hook
  group_by: [alertname, rule, service]
  group_wait: 200ms
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {notify_url}
        send_resolved: true
""")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AlertmanagerServer:
        log = open(self.dir / "alertmanager.log", "ab")  # noqa: SIM115 (the process owns it)
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'alertmanager.yml'}",
             f"--storage.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("alertmanager did not start: "
                                   + (self.dir / "alertmanager.log").read_text()[-2000:])
            time.sleep(0.1)

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as reply:
            return json.loads(reply.read())  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.process is not None:
            stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)

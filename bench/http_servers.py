"""Benchmark: the HTTP server under OTLP/HTTP and /metrics, against slow clients and for speed.

    .venv/bin/python bench/http_servers.py [--clients N] [--seconds S] [--candidates a,b,c]

Candidates, each serving one handler that reads a request body whole and answers 200:
  stdlib    http.server.ThreadingHTTPServer, a thread per connection (the sidecar before)
  aiohttp   sidecar.live.http_server.HttpServer (what the sidecar serves with now), with the
            sidecar's default --http-timeout of 30 s (a request head is due within 10 s)
  uvicorn   uvicorn with h11, timeout_keep_alive 10 s and limit_concurrency 1024 (only when
            uvicorn is installed: it is not a dependency; `pip install uvicorn` to compare)

Figures, per candidate, in one run:
  trickle   N clients each send an incomplete request head, then one more byte every 2 s, for S
            seconds (beyond the 10 s head deadline). Reported: threads in this process at the
            peak, how many of the N connections the server had closed by the end, the slowest
            GET /healthz answered on a fresh connection meanwhile, and the time for one to be
            answered once all N clients disconnect at once.
  speed     400 POSTs of a 256 KiB body over 4 keep-alive connections: requests/s, and the
            ratio to stdlib's measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web  # noqa: E402

from sidecar.live.http_server import HttpServer, read_body  # noqa: E402

BODY = bytes(256 << 10)
HEAD = b"POST /v1/traces HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-protobuf\r\n"


class _StdlibHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(str(len(body)).encode())

    def do_GET(self) -> None:  # noqa: N802
        self._answer(b"ok\n")

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def stdlib() -> tuple[int, Callable[[], None]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StdlibHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
    return server.server_address[1], stop


def aiohttp_server() -> tuple[int, Callable[[], None]]:
    async def handle(request: web.BaseRequest) -> web.Response:
        if request.method == "GET":
            return web.Response(text="ok\n")
        return web.Response(text=str(len(await read_body(request, 64 << 20))))

    server = HttpServer(handle, ("127.0.0.1", 0), "bench")
    server.start()
    return server.port, server.close


def uvicorn_server() -> tuple[int, Callable[[], None]]:
    import uvicorn

    async def app(scope: dict, receive: Callable, send: Callable) -> None:  # type: ignore[type-arg]
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"ok\n" if scope["method"] == "GET" else str(size).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http="h11", timeout_keep_alive=10, limit_concurrency=1024,
                            log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
    return sock.getsockname()[1], stop


def healthz(port: int, timeout: float = 60.0) -> float:
    """Seconds for GET /healthz on a fresh connection (the timeout if unanswered)."""
    started = time.monotonic()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        connection.close()
    except OSError:
        return timeout
    return time.monotonic() - started


def trickle(port: int, clients: int, seconds: float) -> dict[str, float]:
    threads_before = threading.active_count()
    socks = []
    for _ in range(clients):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(HEAD[:20])
        socks.append(sock)
    peak_threads, slowest, closed = 0, 0.0, set()
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for index, sock in enumerate(socks):
            if index not in closed:
                try:
                    sock.sendall(b"X")
                except OSError:
                    closed.add(index)
        peak_threads = max(peak_threads, threading.active_count() - threads_before)
        slowest = max(slowest, healthz(port, timeout=10.0))
        time.sleep(2.0)
    for index, sock in enumerate(socks):  # a closed one reads as EOF or a reset
        if index not in closed:
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed.add(index)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(index)
    for sock in socks:
        sock.close()
    recovery = healthz(port)
    return {"threads": peak_threads, "closed": len(closed), "slowest_healthz": slowest,
            "recovery": recovery}


def speed(port: int, requests: int = 400, connections: int = 4) -> float:
    def run(count: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(count):
            connection.request("POST", "/v1/traces", BODY,
                               {"Content-Type": "application/x-protobuf"})
            answer = connection.getresponse()
            assert answer.read() == str(len(BODY)).encode()
        connection.close()

    started = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(run, [requests // connections] * connections))
    return requests / (time.monotonic() - started)


CANDIDATES = {"stdlib": stdlib, "aiohttp": aiohttp_server, "uvicorn": uvicorn_server}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=16.0)
    parser.add_argument("--candidates", default="stdlib,aiohttp,uvicorn")
    args = parser.parse_args()
    rows, baseline = [], None
    for name in args.candidates.split(","):
        try:
            port, stop = CANDIDATES[name]()
        except ImportError as exc:
            print(f"{name}: not installed ({exc}); skipped")
            continue
        try:
            rate = speed(port)
            baseline = baseline or (rate if name == "stdlib" else None)
            found = trickle(port, args.clients, args.seconds)
        finally:
            stop()
        rows.append((name, rate, found))
        print(f"{name}: {rate:.0f} req/s; trickle: peak +{found['threads']:.0f} threads, "
              f"{found['closed']:.0f}/{args.clients} cut off after {args.seconds:g}s, slowest "
              f"/healthz {found['slowest_healthz']:.2f}s, after mass disconnect "
              f"{found['recovery']:.2f}s", flush=True)
    print(f"\n{'server':<10}{'req/s':>8}{'× stdlib':>10}{'threads':>9}{'cut off':>9}"
          f"{'slowest /healthz':>18}{'recovery':>10}")
    for name, rate, found in rows:
        ratio = f"{rate / baseline:.2f}" if baseline else "-"
        print(f"{name:<10}{rate:>8.0f}{ratio:>10}{found['threads']:>9.0f}"
              f"{found['closed']:>9.0f}{found['slowest_healthz']:>17.2f}s"
              f"{found['recovery']:>9.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

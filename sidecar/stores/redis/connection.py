"""Redis URLs to clients: standalone, TLS, unix socket, or Cluster."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster


def connect(url: str) -> redis.Redis | RedisCluster:
    """`redis://[:password@]host:port/db`, `rediss://...` (TLS), `unix:///path.sock`, or
    `redis+cluster://host:port[,host:port...]` (`rediss+cluster://` for TLS)."""
    options = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    scheme = url.split("://", 1)[0]
    if scheme in ("redis+cluster", "rediss+cluster"):
        parts = urlsplit(url)
        nodes = [ClusterNode(*_host_port(hp)) for hp in parts.netloc.rsplit("@", 1)[-1].split(",")]
        return RedisCluster(startup_nodes=nodes, password=parts.password,
                            username=parts.username or None, ssl=scheme == "rediss+cluster",
                            **options)
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"store {url!r}: expected memory, redis://, rediss://, unix:// or "
                         "redis+cluster://")
    return redis.Redis.from_url(url, **options)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)

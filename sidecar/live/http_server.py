"""The sidecar's HTTP servers (OTLP/HTTP ingest, and metrics and health), each on aiohttp's
low-level server in an event loop of its own thread.

aiohttp rather than the standard library's thread per connection, or uvicorn (both measured in
bench/http_servers.py): a connection must deliver a whole request head within a third of
`timeout` of opening, or of its last answer, however slowly it trickles, so a slow client costs
a socket for seconds and never a thread; uvicorn resets its only timeout on every byte
received. Bodies may be chunked; a handler reads them through `read_body`, which bounds their
size, and their time by `timeout`. Connections beyond `max_connections` are closed as they open.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

HTTP_TIMEOUT = 30.0  # seconds to send a request's body; a third of it for its head
MAX_CONNECTIONS = 1024


class BodyError(Exception):
    """A request body that cannot be read: the HTTP status to answer, and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: web.BaseRequest, limit: int,
                    timeout: float = HTTP_TIMEOUT) -> bytes:
    """The request's body, decompressed (gzip or deflate), at most `limit` bytes before and
    after decompression (413 beyond: a small gzip bomb never inflates past it), sent within
    `timeout` (408 after: a Content-Length larger than the body holds nothing for long)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(413, f"body of {request.content_length} bytes exceeds {limit}")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise BodyError(400, f"unsupported Content-Encoding {encoding!r}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > limit:
                    raise BodyError(413, f"body exceeds {limit} bytes")
    except TimeoutError:
        raise BodyError(408, f"body not received within {timeout:g}s") from None
    if encoding == "identity":
        return bytes(body)
    return _inflate(body, encoding, limit)


def _inflate(data: bytes | bytearray, encoding: str, limit: int) -> bytes:
    """gzip (every member) or zlib-wrapped deflate, stopping at `limit` bytes of output."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    out = bytearray()
    try:
        while data:
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit or inflater.unconsumed_tail:
                raise BodyError(413, f"{encoding} body inflates beyond {limit} bytes")
            if not inflater.eof:
                raise BodyError(400, f"cannot decompress {encoding} body: truncated")
            data = inflater.unused_data if encoding == "gzip" else b""
    except zlib.error as exc:
        raise BodyError(400, f"cannot decompress {encoding} body: {exc}") from None
    return bytes(out)


class _CappedServer(web.Server):
    """aiohttp's server, closing a connection that would go beyond `max_connections`."""

    def __init__(self, handler: Handler, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self.max_connections:
            transport.abort()


class HttpServer:
    """One listening address served by `handler` on its own event loop thread. The port is
    bound when this returns (OSError if it cannot be)."""

    def __init__(self, handler: Handler, address: tuple[str, int], name: str,
                 timeout: float = HTTP_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        try:
            self._runner, self._site, self.port = self._loop.run_until_complete(
                self._bind(handler, address, timeout / 3, max_connections, tls))
        except BaseException:
            self._loop.close()
            raise

    async def _bind(self, handler: Handler, address: tuple[str, int], head_timeout: float,
                    max_connections: int, tls: ssl.SSLContext | None,
                    ) -> tuple[web.BaseRunner, web.TCPSite, int]:
        server = _CappedServer(handler, max_connections, keepalive_timeout=head_timeout,
                               auto_decompress=False, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, address[0], address[1], backlog=512, reuse_address=True,
                           ssl_context=tls)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        sockets = site._server.sockets if site._server is not None else ()  # type: ignore[union-attr]
        return runner, site, sockets[0].getsockname()[1]

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name,
                                        daemon=True)
        self._thread.start()
        return self._thread

    def call(self, coroutine: Any, timeout: float) -> Any:
        """Run `coroutine` on this server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop_accepting(self, timeout: float = 5.0) -> None:
        """Close the listening socket; open connections are still served."""
        self.call(self._site.stop(), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, end the loop thread."""
        try:
            self.call(self._runner.cleanup(), timeout)
        except Exception:  # noqa: BLE001 - closing anyway
            log.warning("%s: connections did not close within %gs", self.name, timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        if not self._loop.is_running():
            self._loop.close()

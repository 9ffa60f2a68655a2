"""TLS certificates and bearer tokens for the listeners, read from files and reloaded when the
files change: cert-manager and Kubernetes Secrets rotate them in place, and a restart to pick
them up would drop the traces held in memory.

Each file is looked at (one `stat`) when it is used, never polled: a new TLS handshake, a request
that must carry a token.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)


class CredentialError(ValueError):
    """A certificate, key or token file that cannot be used, and why."""


def fingerprint(*paths: str) -> tuple[tuple[int, int, int], ...] | None:
    """What changes when a file is rewritten or a ConfigMap/Secret symlink is swapped."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stamps)


class Watched:
    """A value loaded from files, reloaded when their fingerprint changes; a failed reload keeps
    the last good value (logged once per change, counted by `on_failure`)."""

    def __init__(self, paths: tuple[str, ...], load: Callable[[], Any], what: str,
                 on_failure: Callable[[], object] = lambda: None) -> None:
        self._paths = paths
        self._load = load
        self._what = what
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._seen = fingerprint(*paths)
        self._value = load()  # at start-up a failure is the caller's to report

    def current(self) -> Any:
        stamp = fingerprint(*self._paths)
        if stamp == self._seen or stamp is None:  # unchanged, or mid-swap: keep what works
            return self._value
        with self._lock:
            if stamp != self._seen:
                self._seen = stamp
                try:
                    self._value = self._load()
                except Exception as exc:  # noqa: BLE001 (whatever it is, keep the last good)
                    self._on_failure()
                    log.error("%s reload failed; keeping the last good one: %s", self._what, exc)
                else:
                    log.info("%s reloaded", self._what)
            return self._value


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """An HTTP/1.1 server's TLS context; with `client_ca`, clients must present a certificate
    it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise CredentialError(f"cannot load the TLS certificate {cert} and key {key} (PEM "
                              f"files, the key matching the certificate): {exc}") from None
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise CredentialError(f"cannot load the client CA {client_ca} (PEM): {exc}") \
                from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class TlsFiles:
    """The sidecar's certificate and key, and the CA its OTLP clients' certificates must be
    signed by ('' = clients need none)."""

    cert: str
    key: str
    client_ca: str = ""


class ServerTls:
    """TLS for the sidecar's three listeners from one certificate, kept current. OTLP ingest
    asks for client certificates when a client CA is given; the metrics port never does, so
    the kubelet's probes (which present none) still reach /healthz and /readyz."""

    def __init__(self, files: TlsFiles, on_failure: Callable[[], object] = lambda: None) -> None:
        self.files = files
        paths = tuple(p for p in (files.cert, files.key, files.client_ca) if p)
        what = f"TLS certificate {files.cert}"
        self._contexts = {
            asks: Watched(paths, lambda asks=asks: server_context(
                files.cert, files.key, files.client_ca if asks else ""), what, on_failure)
            for asks in {False, bool(files.client_ca)}}
        self._pem = Watched(paths, self._read_pem, what, on_failure)

    def _read_pem(self) -> tuple[bytes, bytes, bytes | None]:
        server_context(self.files.cert, self.files.key, self.files.client_ca)  # valid first
        files = self.files
        return (Path(files.key).read_bytes(), Path(files.cert).read_bytes(),
                Path(files.client_ca).read_bytes() if files.client_ca else None)

    def ssl_context(self, ingest: bool) -> ssl.SSLContext:
        """For an aiohttp listener. Its server keeps one context for good, so that context
        swaps each handshake onto the current one (the SNI callback runs on every ClientHello,
        with or without a server name)."""
        asks = ingest and bool(self.files.client_ca)
        watched = self._contexts[asks]
        # whether a client certificate is asked for stays the front's; the rest is swapped
        front = server_context(self.files.cert, self.files.key,
                               self.files.client_ca if asks else "")

        def current(connection: Any, _server_name: str | None, _context: Any) -> None:
            connection.context = watched.current()

        front.sni_callback = current
        return front

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """For the gRPC listener: gRPC asks for the configuration on each handshake."""
        seen = self._pem.current()

        def configuration(pem: tuple[bytes, bytes, bytes | None]) -> Any:
            return grpc.ssl_server_certificate_configuration([pem[:2]], root_certificates=pem[2])

        def fetch() -> Any:
            nonlocal seen
            pem = self._pem.current()
            if pem is seen:
                return None  # unchanged
            seen = pem
            return configuration(pem)

        return grpc.dynamic_ssl_server_credentials(
            configuration(seen), fetch, require_client_authentication=bool(self.files.client_ca))


def read_secret(path: str, what: str = "secret") -> bytes:
    """A token or key file's content, surrounding whitespace ignored (raises CredentialError
    naming the file, never showing its content)."""
    try:
        with open(path, "rb") as file:
            secret = file.read().strip()
    except OSError as exc:
        raise CredentialError(f"cannot read the {what} file {path}: "
                              f"{exc.strerror or exc}") from None
    if not secret:
        raise CredentialError(f"the {what} file {path} is empty")
    return secret


class BearerToken:
    """The token a client must send as `Authorization: Bearer <token>`, read from a file
    (surrounding whitespace ignored) and compared in constant time."""

    def __init__(self, path: str, on_failure: Callable[[], object] = lambda: None) -> None:
        self.path = path
        self._token = Watched((path,), self._read, f"bearer token {path}", on_failure)

    def _read(self) -> bytes:
        return read_secret(self.path, "token")

    def allows(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self._token.current())

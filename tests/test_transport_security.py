"""Transport security (hardening finding 6): TLS, client certificates and bearer tokens on OTLP
ingest and /metrics, rotated in place, and TLS with headers for the violation span export. Real
sidecars on loopback, certificates made by the `openssl` CLI, the real OpenTelemetry SDK
exporter as the client."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Scrape
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from test_serve_e2e import (  # noqa: F401 (start_sidecar is a fixture)
    Running,
    charge_trace,
    pb_request,
    start_sidecar,
)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
TOKEN = "s3cret-token"


# --- certificates -------------------------------------------------------------------------------

def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN=betrace-test-{name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_leaf(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost (server and client use), signed by `ca`."""
    cert, key, request = (directory / f"{name}.crt", directory / f"{name}.key",
                          directory / f"{name}.csr")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext", "extendedKeyUsage=serverAuth,clientAuth")
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-days", "2", "-copy_extensions", "copyall", "-out", str(cert))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two CAs; a server and a client certificate signed by the first, a server certificate
    signed by the second (the rotation target)."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(directory, "ca"), make_ca(directory, "other-ca")
    return {"ca": ca, "other-ca": other, "server": make_leaf(directory, "server", ca),
            "client": make_leaf(directory, "client", ca),
            "rotated": make_leaf(directory, "rotated", other)}


@pytest.fixture
def files(tmp_path: Path, pki: dict[str, tuple[Path, Path]]) -> dict[str, Path]:
    """The server's certificate, key and a token, as files a test may rewrite."""
    paths = {"cert": tmp_path / "tls.crt", "key": tmp_path / "tls.key",
             "token": tmp_path / "token", "metrics-token": tmp_path / "metrics-token"}
    paths["cert"].write_bytes(pki["server"][0].read_bytes())
    paths["key"].write_bytes(pki["server"][1].read_bytes())
    paths["token"].write_text(TOKEN + "\n")
    paths["metrics-token"].write_text("scrape-token")
    return paths


def rewrite(path: Path, data: bytes) -> None:
    """As a rotation does: new content, a new modification time."""
    path.write_bytes(data)
    stamp = time.time() + 1
    os.utime(path, (stamp, stamp))


# --- clients ------------------------------------------------------------------------------------

def grpc_export(port: int, ca: Path, token: str | None = None,
                client: tuple[Path, Path] | None = None) -> grpc.StatusCode:
    """One Export over a fresh TLS channel: OK or the error's code."""
    credentials = grpc.ssl_channel_credentials(
        ca.read_bytes(), *(client[1].read_bytes(), client[0].read_bytes()) if client else ())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        call = channel.unary_unary(EXPORT)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        try:
            call(pb_request(b"\x07" * 16, ["checkout"]).SerializeToString(), timeout=5,
                 metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def https(port: int, path: str, ca: Path, token: str | None = None, body: bytes | None = None,
          client: tuple[Path, Path] | None = None) -> tuple[int, bytes, dict[str, str]]:
    context = ssl.create_default_context(cafile=str(ca))
    if client:
        context.load_cert_chain(str(client[0]), str(client[1]))
    headers = {"Content-Type": "application/x-protobuf"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=body,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as reply:
            return reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), dict(exc.headers)


def served_subject(port: int) -> str:
    """The common name of the certificate served on `port` (not verified)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject"],
                          input=der, capture_output=True, check=True, timeout=30).stdout
    return text.decode().strip().rpartition("=")[2].strip()


def scrape_tls(port: int, ca: Path, token: str) -> Scrape:
    status, body, _ = https(port, "/metrics", ca, token)
    assert status == 200
    return Scrape(body.decode())


def sdk_tracer(port: int, ca: Path, token: str | None) -> tuple[TracerProvider, Any]:
    """The real SDK exporter over TLS, with the token as the collector's bearertokenauth sends
    it."""
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    exporter = OTLPSpanExporter(
        endpoint=f"127.0.0.1:{port}", insecure=False, timeout=5,
        credentials=grpc.ssl_channel_credentials(ca.read_bytes()),
        headers={"authorization": f"Bearer {token}"} if token else None)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, provider.get_tracer("betrace-tests")


def secured(start_sidecar: Callable[..., Running], files: dict[str, Path],
            **overrides: Any) -> Running:
    return start_sidecar(tls_cert=str(files["cert"]), tls_key=str(files["key"]),
                         otlp_token_file=str(files["token"]),
                         metrics_token_file=str(files["metrics-token"]), **overrides)


# --- the tests ----------------------------------------------------------------------------------

def test_otlp_over_tls_is_heard_only_with_the_token(
        start_sidecar: Callable[..., Running], files: dict[str, Path],
        pki: dict[str, tuple[Path, Path]], wait_until: Callable[..., Any]) -> None:
    running = secured(start_sidecar, files)
    sidecar, ca = running.sidecar, pki["ca"][0]

    provider, tracer = sdk_tracer(sidecar.grpc_port, ca, TOKEN)
    try:
        charge_trace(tracer, order_id="with-token")
    finally:
        provider.shutdown()
    wait_until(lambda: running.signals("double-charge"), what="signal from the TLS sender")

    provider, tracer = sdk_tracer(sidecar.grpc_port, ca, "wrong")
    try:
        charge_trace(tracer, order_id="wrong-token")
    finally:
        provider.shutdown()
    metrics = scrape_tls(sidecar.metrics_port, ca, "scrape-token")
    # two charges and a checkout span, each exported alone and refused
    assert metrics.value("betrace_export_requests_rejected_total", transport="grpc",
                         reason="unauthenticated") == 3
    assert metrics.value("betrace_spans_received_total", transport="grpc") == 3
    assert grpc_export(sidecar.grpc_port, ca) == grpc.StatusCode.UNAUTHENTICATED

    # OTLP/HTTP on the same certificate and token
    body = pb_request(b"\x08" * 16, ["checkout"]).SerializeToString()
    status, _, headers = https(sidecar.http_port, "/v1/traces", ca, body=body)
    assert (status, headers.get("WWW-Authenticate")) == (401, 'Bearer realm="otlp"')
    assert https(sidecar.http_port, "/v1/traces", ca, "nope", body=body)[0] == 401
    assert https(sidecar.http_port, "/v1/traces", ca, TOKEN, body=body)[0] == 200

    # a plain-text client gets nowhere
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/healthz", timeout=5)
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(EXPORT)(b"", timeout=5, metadata=[
                ("authorization", f"Bearer {TOKEN}")])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_need_their_token_and_probes_need_none(
        start_sidecar: Callable[..., Running], files: dict[str, Path],
        pki: dict[str, tuple[Path, Path]]) -> None:
    running = secured(start_sidecar, files, tls_client_ca=str(pki["ca"][0]))
    port, ca = running.sidecar.metrics_port, pki["ca"][0]
    assert https(port, "/metrics", ca)[0] == 401
    assert https(port, "/metrics", ca, TOKEN)[0] == 401  # the ingest token is not the scraper's
    status, body, _ = https(port, "/metrics", ca, "scrape-token")
    assert status == 200 and b"betrace_spans_received_total" in body
    # no client certificate asked for on the metrics port, and no token on the probes
    assert https(port, "/healthz", ca)[:2] == (200, b"ok\n")
    assert https(port, "/readyz", ca)[0] == 200


def test_client_certificates_are_required_on_ingest_when_a_client_ca_is_given(
        start_sidecar: Callable[..., Running], files: dict[str, Path],
        pki: dict[str, tuple[Path, Path]]) -> None:
    running = secured(start_sidecar, files, tls_client_ca=str(pki["ca"][0]))
    sidecar, ca, client = running.sidecar, pki["ca"][0], pki["client"]
    assert grpc_export(sidecar.grpc_port, ca, TOKEN) == grpc.StatusCode.UNAVAILABLE
    assert grpc_export(sidecar.grpc_port, ca, TOKEN, client) == grpc.StatusCode.OK
    # a certificate from another CA is refused too
    assert grpc_export(sidecar.grpc_port, ca, TOKEN, pki["rotated"]) == \
        grpc.StatusCode.UNAVAILABLE
    body = pb_request(b"\x09" * 16, ["checkout"]).SerializeToString()
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        https(sidecar.http_port, "/v1/traces", ca, TOKEN, body=body)
    assert https(sidecar.http_port, "/v1/traces", ca, TOKEN, body=body, client=client)[0] == 200


def test_a_rotated_token_and_certificate_are_used_without_a_restart(
        start_sidecar: Callable[..., Running], files: dict[str, Path],
        pki: dict[str, tuple[Path, Path]], wait_until: Callable[..., Any]) -> None:
    running = secured(start_sidecar, files)
    sidecar, ca, other = running.sidecar, pki["ca"][0], pki["other-ca"][0]
    body = pb_request(b"\x0a" * 16, ["checkout"]).SerializeToString()
    assert grpc_export(sidecar.grpc_port, ca, TOKEN) == grpc.StatusCode.OK

    rewrite(files["token"], b"next-token\n")
    assert grpc_export(sidecar.grpc_port, ca, TOKEN) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_export(sidecar.grpc_port, ca, "next-token") == grpc.StatusCode.OK
    assert https(sidecar.http_port, "/v1/traces", ca, TOKEN, body=body)[0] == 401
    assert https(sidecar.http_port, "/v1/traces", ca, "next-token", body=body)[0] == 200

    rewrite(files["key"], pki["rotated"][1].read_bytes())
    rewrite(files["cert"], pki["rotated"][0].read_bytes())
    for port in (sidecar.http_port, sidecar.metrics_port):
        assert served_subject(port) == "rotated"
    assert grpc_export(sidecar.grpc_port, other, "next-token") == grpc.StatusCode.OK
    assert grpc_export(sidecar.grpc_port, ca, "next-token") == grpc.StatusCode.UNAVAILABLE
    assert https(sidecar.http_port, "/v1/traces", other, "next-token", body=body)[0] == 200

    # a broken rotation keeps the last good certificate and token, and is counted
    rewrite(files["cert"], b"not a certificate")
    rewrite(files["token"], b"  \n")
    assert served_subject(sidecar.http_port) == "rotated"
    assert grpc_export(sidecar.grpc_port, other, "next-token") == grpc.StatusCode.OK
    metrics = scrape_tls(sidecar.metrics_port, other, "scrape-token")
    assert metrics.value("betrace_credential_reload_failures_total") >= 2


def test_violation_spans_are_exported_over_tls_with_headers(
        start_sidecar: Callable[..., Running], files: dict[str, Path],
        pki: dict[str, tuple[Path, Path]], sdk_client: Callable[..., Any],
        scrape: Callable[..., Scrape], wait_until: Callable[..., Any]) -> None:
    """Sidecar A sends its violation spans to sidecar B, which asks for TLS and a token: B
    hears them (and drops them as its own kind); with a wrong token A counts them lost."""
    receiver = secured(start_sidecar, files)
    ca, port = pki["ca"][0], receiver.sidecar.grpc_port

    def received() -> float:
        return scrape_tls(receiver.sidecar.metrics_port, ca, "scrape-token").value(
            "betrace_spans_dropped_total", reason="own_violation")

    sender = start_sidecar(export_otlp=f"https://127.0.0.1:{port}", export_otlp_ca=str(ca),
                           export_otlp_headers=f"Authorization=Bearer%20{TOKEN}")
    charge_trace(sdk_client(sender.sidecar.grpc_port).tracer, order_id="exported")
    wait_until(lambda: received() >= 1, timeout=10, what="violation span heard by B")

    refused = start_sidecar(export_otlp=f"127.0.0.1:{port}", export_otlp_ca=str(ca),
                            export_otlp_headers="authorization=Bearer wrong")
    charge_trace(sdk_client(refused.sidecar.grpc_port).tracer, order_id="refused")
    wait_until(lambda: refused.signals("double-charge"), what="signal")
    wait_until(lambda: scrape(refused.sidecar.metrics_port).value(
        "betrace_signal_export_failures_total", sink="otlp") >= 1, timeout=15,
        what="the refused export counted")


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "x.crt"], "tls-cert and tls-key go together"),
    (["--tls-client-ca", "ca.crt"], "tls-client-ca needs tls-cert and tls-key"),
    (["--export-otlp-headers", "a=b"], "export-otlp-ca and export-otlp-headers need export-otlp"),
    (["--export-otlp", "127.0.0.1:4317", "--export-otlp-headers", "Bearer hidden"],
     "export-otlp-headers: item 1 is not key=value"),
    (["--tls-cert", "missing.crt", "--tls-key", "missing.key"],
     "cannot load the TLS certificate missing.crt and key missing.key"),
    (["--otlp-token-file", "missing-token"], "cannot read the token file missing-token"),
])
def test_unusable_security_settings_stop_the_start_saying_why(
        tmp_path: Path, flags: list[str], message: str) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--rules", str(rules), "--listen",
         "127.0.0.1:0", "--http-listen", "", "--metrics-listen", "", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "hidden" not in done.stderr

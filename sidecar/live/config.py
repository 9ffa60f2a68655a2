"""Settings of `betrace serve`: one dataclass with a documented default for every field and a
`validate()` that names every problem; the CLI only fills it from flags and BETRACE_* variables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote

from sidecar.model.signals import MAX_VALUE_BYTES, trace_url_problem
from sidecar.signaldb import open_signal_db
from sidecar.stores.trace_store import StoreLimits

STORE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


@dataclass
class Settings:
    """Every knob of `betrace serve`, with the defaults a sidecar in the collector's pod wants."""

    rules: list[str] = field(default_factory=lambda: ["rules"])
    listen: str = "127.0.0.1:4319"  # OTLP gRPC (the collector owns 4317/4318)
    http_listen: str = "127.0.0.1:4320"  # OTLP/HTTP; "" turns it off
    metrics_listen: str = "127.0.0.1:9464"  # /metrics, /healthz, /readyz; "" turns it off
    decision_wait: float = 10.0
    max_trace_age: float = 300.0
    max_traces: int = 50_000
    max_spans_per_trace: int = 10_000
    max_trace_bytes: int = StoreLimits.max_trace_bytes  # spans' bytes held per trace
    decided_retention: float = 60.0
    max_trace_ids: int = 200_000  # traces held by id alone, for rules true without their spans
    signals_out: str | None = None  # JSONL signal log: a path, or "-" for stdout
    export_otlp: str | None = None  # host:port receiving violation spans over OTLP gRPC
    store: str = "memory"  # or redis://, rediss://, unix://, redis+cluster://host:port,...
    claim_lease: float = 30.0  # a trace claimed by a sidecar that dies is re-decided after this
    reload_interval: float = 2.0
    # OTLP/HTTP and metrics: a request's body must arrive within this, its head within a third
    http_timeout: float = 30.0
    max_signal_value_bytes: int = MAX_VALUE_BYTES  # each context value a signal carries
    signal_budget: float = 1000.0  # signals a second per rule (10x at once) written; 0: no cap
    # TLS on the three listeners (PEM files, reloaded when they change); "" = plain text
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # OTLP senders must present a certificate signed by this CA
    # files holding the bearer token OTLP senders, and scrapers of /metrics, must send
    otlp_token_file: str = ""
    metrics_token_file: str = ""
    export_otlp_ca: str = ""  # CA verifying the --export-otlp endpoint; implies TLS
    export_otlp_headers: str = ""  # key=value,... sent with every export (URL-encoded values)
    # the signal database (sqlite:///path, postgresql://...); "" = none
    signals_db: str = ""
    signals_db_password_file: str = ""  # its PostgreSQL password, apart from the URL
    signals_retention: float = 730 * 86400.0  # signals older than this are pruned; 0: never
    # routing: Alertmanager's base URL, and a plain JSON webhook; "" = none
    alertmanager: str = ""
    alertmanager_resolve_after: float = 300.0  # an alert ends this long after its signal
    webhook: str = ""
    webhook_secret_file: str = ""  # HMAC-SHA256 key signing each webhook body
    trace_url: str = ""  # a link to the trace: a template holding {trace_id}

    def validate(self) -> list[str]:
        problems = []
        for name in ("decision_wait", "max_trace_age", "decided_retention", "reload_interval",
                     "claim_lease", "http_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name.replace('_', '-')} must be positive")
        if self.max_trace_age < self.decision_wait:
            problems.append("max-trace-age must be at least decision-wait")
        for name in ("max_traces", "max_spans_per_trace", "max_trace_bytes", "max_trace_ids",
                     "max_signal_value_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        if self.signal_budget < 0:
            problems.append("signal-budget must be 0 (no budget) or positive")
        problems += address_problems(self, "listen", "http_listen", "metrics_listen")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls-cert and tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls-client-ca needs tls-cert and tls-key")
        if (self.export_otlp_ca or self.export_otlp_headers) and not self.export_otlp:
            problems.append("export-otlp-ca and export-otlp-headers need export-otlp")
        try:
            parse_headers(self.export_otlp_headers)
        except ValueError as exc:
            problems.append(f"export-otlp-headers: {exc}")
        if self.signals_db:
            try:
                open_signal_db(self.signals_db)
            except ValueError as exc:
                problems.append(f"signals-db: {exc}")
        elif self.signals_db_password_file:
            problems.append("signals-db-password-file needs signals-db")
        for name in ("alertmanager", "webhook"):
            url = getattr(self, name)
            if url and not url.startswith(("http://", "https://")):
                problems.append(f"{name} {url!r}: expected an http:// or https:// URL")
        if self.webhook_secret_file and not self.webhook:
            problems.append("webhook-secret-file needs webhook")
        if self.trace_url and (problem := trace_url_problem(self.trace_url)):
            problems.append(f"trace-url {problem}")
        if self.alertmanager_resolve_after <= 0:
            problems.append("alertmanager-resolve-after must be positive")
        if self.signals_retention < 0:
            problems.append("signals-retention must be 0 (keep for ever) or positive")
        if self.store != "memory" and not self.store.startswith(STORE_SCHEMES):
            problems.append(f"store {self.store!r}: expected memory or a URL starting with "
                            f"{', '.join(STORE_SCHEMES)}")
        return problems

    def limits(self) -> StoreLimits:
        return StoreLimits(self.decision_wait, self.max_trace_age, self.max_traces,
                           self.max_spans_per_trace, self.decided_retention, self.claim_lease,
                           self.max_trace_ids, self.max_trace_bytes)


def parse_headers(text: str) -> dict[str, str]:
    """`key=value,key2=value2` (values URL-encoded, as in OTEL_EXPORTER_OTLP_HEADERS) to gRPC
    metadata, whose keys are lower case."""
    headers = {}
    for number, item in enumerate(text.split(","), 1):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():  # the item is not shown: it may hold a secret
            raise ValueError(f"item {number} is not key=value")
        headers[key.strip().lower()] = unquote(value.strip())
    return headers


def address_problems(settings: object, required: str, *optional: str) -> list[str]:
    """What is wrong with HOST:PORT settings; the optional ones may be '' (off)."""
    problems = []
    for name in (required, *optional):
        value = getattr(settings, name)
        if value or name == required:
            try:
                split_address(value)
            except ValueError as exc:
                problems.append(f"{name.replace('_', '-')}: {exc}")
    return problems


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all interfaces) to (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


@contextlib.contextmanager
def binding(listener: str, address: str) -> Iterator[None]:
    """Say which listener could not bind, not just 'Address already in use'."""
    try:
        yield
    except OSError as exc:
        raise OSError(f"cannot listen for {listener} on {address}: {exc.strerror or exc}") \
            from None

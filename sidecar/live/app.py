"""`betrace serve`: the sidecar. Wires settings to the pipeline ingest -> assemble -> evaluate ->
emit, and owns start-up and shutdown (SIGTERM: stop accepting, decide every buffered trace,
flush the exporters, exit 0).
"""

from __future__ import annotations

import gc
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from google.protobuf.internal import api_implementation

from sidecar.live.assembler import Assembler
from sidecar.live.config import Settings, binding, parse_headers, split_address
from sidecar.live.credentials import BearerToken, ServerTls, TlsFiles, read_secret
from sidecar.live.exporters import Emitter, SignalBudget, ViolationSpans
from sidecar.live.metrics import Metrics, MetricsServer
from sidecar.live.receivers import Intake, OtlpHttp, grpc_server
from sidecar.live.reload import RuleWatcher, log_rules
from sidecar.live.signal_log import SignalLog
from sidecar.model.errors import StoreUnavailable
from sidecar.model.signal_writers import JsonLinesWriter, SignalWriter
from sidecar.model.signals import Signal
from sidecar.routing.alertmanager import Alertmanager
from sidecar.routing.dispatcher import BATCH, Dispatcher
from sidecar.routing.posting import Unreachable
from sidecar.routing.webhook import Webhook
from sidecar.rules import RuleSet, load_rules
from sidecar.signaldb import (
    IncompatibleSchema,
    SignalDB,
    SignalDBError,
    open_signal_db,
    read_password,
)
from sidecar.signaldb.writer import Retention
from sidecar.stores import TraceStore
from sidecar.stores.memory import MemoryStore

log = logging.getLogger(__name__)
ALERTS_PER_POST = 100  # signals per Alertmanager or webhook request


class Sidecar:
    """One running sidecar; `start()` binds every port (0 picks a free one), `stop()` drains."""

    def __init__(self, settings: Settings, ruleset: RuleSet | None = None,
                 metrics: Metrics | None = None, store: TraceStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.ruleset = ruleset if ruleset is not None else load_rules(settings.rules)
        self.store = store if store is not None else open_store(settings)
        self.signal_log: SignalLog | None = None
        self._retention: Retention | None = None
        # certificates and tokens are read now: a file that cannot be used stops the start
        failed = self.metrics.credential_reload_failures.inc
        self.tls = ServerTls(TlsFiles(settings.tls_cert, settings.tls_key,
                                      settings.tls_client_ca), failed) \
            if settings.tls_cert else None
        self.metrics_token = BearerToken(settings.metrics_token_file, failed) \
            if settings.metrics_token_file else None
        self.violation_spans: ViolationSpans | None = None
        if settings.export_otlp:
            self.violation_spans = spans = ViolationSpans(settings.export_otlp,
                                   failed=self.metrics.export_failures.labels(sink="otlp").inc,
                                   ca=settings.export_otlp_ca,
                                   headers=parse_headers(settings.export_otlp_headers))
            self.metrics.export_backlog.labels(sink="otlp").set_function(spans.backlog)
        self.emitter = Emitter(self.metrics, self._signal_log(), self.violation_spans,
                               value_limit=settings.max_signal_value_bytes,
                               budget=SignalBudget(settings.signal_budget)
                               if settings.signal_budget else None,
                               queued=self._queued_sinks())
        # a trace stays stored at most this long: past it, no span of it was pruned for rules
        # that were replaced before
        horizon = settings.max_trace_age + settings.decided_retention + settings.claim_lease
        self.assembler = Assembler(self.store, self.ruleset, self.emitter, self.metrics,
                                   horizon=horizon)
        self.metrics.set_rules(((r.id, r.severity) for r in self.ruleset.rules),
                               self.ruleset.digest)
        self.metrics.watch_store(self.store.counts)
        self.intake = Intake(self.assembler, self.metrics,
                             BearerToken(settings.otlp_token_file, failed)
                             if settings.otlp_token_file else None)
        self.watcher = RuleWatcher(settings.rules, self.ruleset, self._swap_rules, self.metrics,
                                   settings.reload_interval)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http: OtlpHttp | None = None
        self._metrics_http: MetricsServer | None = None
        self.grpc_port = self.http_port = self.metrics_port = 0
        self._stopped = False

    def _signal_log(self) -> SignalWriter | None:
        target = self.settings.signals_out
        if not target:
            return None
        if target == "-":
            return JsonLinesWriter(sys.stdout)
        self.signal_log = SignalLog(target, self.metrics.export_failures.labels(sink="log").inc)
        self.metrics.export_backlog.labels(sink="log").set_function(self.signal_log.backlog)
        return self.signal_log

    def _queued_sinks(self) -> list[Dispatcher]:
        """The sinks fed through a queue, each on its own thread: the signal database,
        Alertmanager, a webhook."""
        s, sinks = self.settings, []
        if s.signals_db:
            sinks.append(self._dispatcher("signal_db", self._signal_db().upsert,
                                          (SignalDBError,)))
        if s.alertmanager:
            alertmanager = Alertmanager(s.alertmanager, s.trace_url, s.alertmanager_resolve_after)
            sinks.append(self._dispatcher("alertmanager", alertmanager.deliver, (Unreachable,),
                                          batch=ALERTS_PER_POST))
            log.info("signals routed to Alertmanager %s", redact(s.alertmanager))
        if s.webhook:
            secret = read_secret(s.webhook_secret_file) if s.webhook_secret_file else None
            webhook = Webhook(s.webhook, secret, s.trace_url)
            sinks.append(self._dispatcher("webhook", webhook.deliver, (Unreachable,),
                                          batch=ALERTS_PER_POST))
            log.info("signals posted to %s%s", redact(s.webhook),
                     " (signed)" if secret else "")
        return sinks

    def _dispatcher(self, sink: str, deliver: Callable[[Sequence[Signal]], None],
                    retryable: tuple[type[BaseException], ...], batch: int = BATCH
                    ) -> Dispatcher:
        m = self.metrics
        dispatcher = Dispatcher(
            sink, deliver, retryable, batch=batch,
            delivered=m.signals_delivered.labels(sink=sink).inc,
            failed=m.signal_delivery_errors.labels(sink=sink).inc,
            dropped=lambda reason, count: m.signals_dropped.labels(sink=sink,
                                                                   reason=reason).inc(count))
        m.export_backlog.labels(sink=sink).set_function(dispatcher.backlog)
        return dispatcher

    def _signal_db(self) -> SignalDB:
        """The signal database, connected if it can be now (else the dispatcher retries: signals
        queue meanwhile); one with a newer schema stops the start. Its retention runs on a
        connection of its own."""
        s = self.settings
        password = read_password(s.signals_db_password_file) \
            if s.signals_db_password_file else None
        db = open_signal_db(s.signals_db, password)
        try:
            db.connect()
        except IncompatibleSchema:
            raise
        except SignalDBError as exc:
            log.warning("%s; starting anyway: signals queue and are retried", exc)
        if s.signals_retention:
            self._retention = Retention(open_signal_db(s.signals_db, password),
                                        s.signals_retention)
        log.info("signals stored in %s (retention %s)", db.target,
                 f"{s.signals_retention / 86400:g} days" if s.signals_retention else "none")
        return db

    def _swap_rules(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.assembler.set_rules(ruleset)
        self.metrics.set_rules(((r.id, r.severity) for r in ruleset.rules), ruleset.digest)

    def ready(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "shutting down"
        ok, store = self.store.healthy()
        state = f"{len(self.ruleset.rules)} rules, {store}"
        # a sink that fails turns the sidecar degraded: signals are found but wait in memory
        # (the log) or are lost (the export), so traffic had better go elsewhere. Not the
        # signal database: one central database down must not take every collector pod out
        # of service; its queue and counters show it (betrace_signal_export_backlog).
        failing = [why for sink in (self.signal_log, self.violation_spans) if sink is not None
                   for healthy, why in (sink.healthy(),) if not healthy]
        if failing:
            return False, f"degraded: {state}; {'; '.join(failing)}"
        return ok, f"{'ready' if ok else 'not ready'}: {state}"

    def start(self) -> None:
        if api_implementation.Type() == "python":
            log.warning("protobuf is using its pure-Python backend: ingest will be 10-50x "
                        "slower. Install a protobuf wheel with the upb backend.")
        s = self.settings
        tls = self.tls
        self._grpc, self.grpc_port = grpc_server(
            self.intake, s.listen, credentials=tls.grpc_credentials() if tls else None)
        self._grpc.start()
        if s.http_listen:
            with binding("OTLP/HTTP", s.http_listen):
                self._http = OtlpHttp(self.intake, split_address(s.http_listen),
                                      s.http_timeout, tls=tls.ssl_context(ingest=True)
                                      if tls else None)
            self.http_port = self._http.port
            self._threads.append(self._http.start())
        if s.metrics_listen:
            with binding("metrics", s.metrics_listen):
                self._metrics_http = MetricsServer(
                    self.metrics.registry, split_address(s.metrics_listen), self.ready,
                    s.http_timeout, tls=tls.ssl_context(ingest=False) if tls else None,
                    token=self.metrics_token)
            self.metrics_port = self._metrics_http.port
            self._threads.append(self._metrics_http.start())
        loops = [(self.assembler.run, "decide"), (self.watcher.run, "reload")]
        if self._retention is not None:
            loops.append((self._retention.run, "retention"))
        for target, name in loops:
            thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        host = split_address(s.listen)[0]
        scheme, guard = ("https", " over TLS") if tls else ("http", "")
        if tls and s.tls_client_ca:
            guard += " with client certificates"
        if self.intake.token:
            guard += ", bearer token required"
        log.info("betrace listening: OTLP gRPC %s:%d%s%s%s; %d rule(s) loaded from %s "
                 "(digest %s); store %s; decision wait %gs",
                 host, self.grpc_port,
                 f", OTLP/HTTP {split_address(s.http_listen)[0]}:{self.http_port}"
                 if self._http else "", guard,
                 f", metrics {scheme}://{split_address(s.metrics_listen)[0]}:"
                 f"{self.metrics_port}/metrics"
                 f"{' (bearer token required)' if self.metrics_token else ''}"
                 if self._metrics_http else "",
                 len(self.ruleset.rules), ", ".join(s.rules), self.ruleset.digest[:12],
                 redact(s.store), s.decision_wait)
        log_rules(self.ruleset)

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, decide every buffered trace, flush outputs."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.watcher.poke()  # wake the reload thread now rather than after reload_interval
        # Both transports stop taking spans before the final pass: gRPC refuses new calls and
        # waits for those running; OTLP/HTTP answers 503 to any request on a connection kept
        # alive, and waits for those being read or stored.
        self._grpc.stop(grace).wait()
        if self._http is not None:
            self._http.drain(grace)
        self.assembler.wake()
        for thread in self._threads:
            if thread.name in ("decide", "reload"):
                thread.join(timeout=grace)
        try:
            decided = self.assembler.drain()
        except StoreUnavailable as exc:  # a shared store: its traces wait there for the others
            decided = 0
            self.metrics.store_errors.labels(operation="decide").inc()
            log.error("could not decide the buffered traces on the way out (%s): they stay in "
                      "the store, for the other sidecars or this one restarted", exc)
        if self._http is not None:
            self._http.close()
        self.emitter.close()
        if self._metrics_http is not None:
            self._metrics_http.close()
        self.store.close()
        log.info("betrace stopped; decided %d buffered trace(s) on the way out", decided)

    def serve_forever(self) -> int:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the rules."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.watcher.poke())
        self.start()
        collect_less()
        while not stop.wait(1.0):
            pass
        self.stop()
        return 0


def collect_less() -> None:
    """Tune the cyclic garbage collector for a long-running ingest process. What start-up made
    (modules, rules, clients) lives as long as the process, so it is frozen out of every
    collection; and a 512-span request makes thousands of containers that die young, so the
    youngest generation is collected after 10,000 allocations instead of 700 (at the default,
    collections took about a tenth of the sidecar's CPU under load)."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def redact(url: str) -> str:
    """A store URL fit for a log: the password replaced by ***."""
    return re.sub(r"(://[^/:@]*:)[^/]*@", r"\1***@", url)


def open_store(settings: Settings) -> TraceStore:
    """The embedded memory store, or Redis shared by every sidecar."""
    if settings.store == "memory":
        return MemoryStore(settings.limits())
    from sidecar.stores.redis import RedisStore

    return RedisStore.from_url(settings.store, settings.limits())

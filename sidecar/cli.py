"""The `betrace` command line: it only wires arguments to the objects that do the work."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from sidecar import __version__
from sidecar.live.config import Settings
from sidecar.model.errors import IncompatibleStore, RuleLoadError
from sidecar.model.signals import MAX_VALUE_BYTES
from sidecar.replay.progress import MODES
from sidecar.rules import RuleSet, load_rules

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE, EXIT_SKIPPED_INPUT, EXIT_RULE_ERRORS = 0, 1, 2, 3, 4


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_UNUSABLE
    try:
        return int(args.run(args))
    except BrokenPipeError:  # `betrace replay ... | head` is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt as exc:
        return 143 if isinstance(exc, _Terminated) else 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that `with` blocks clean up (replay's
    temp directory and worker processes)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="betrace", description="Behavioral assurance for OpenTelemetry: invariants as "
        "rules over traces.")
    parser.add_argument("--version", action="version", version=f"betrace {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    check = commands.add_parser(
        "check", help="validate rule files and report every error",
        description="Load rule files (or directories of them) and report every error with "
        "file:line:column, then warnings (to stderr), each at its rule or declaration: a rule "
        "that fires on traces without its spans, a \"*\" selector (every span is kept), an "
        "unused list or macro, a span name no other rule or example names (a misspelt macro "
        "reads as one), a rule with no examples. Exit 1 if there is any error, or any warning "
        "with --strict.")
    check.add_argument("paths", nargs="+", metavar="PATH", help="rule file or directory")
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument("--strict", action="store_true",
                       help="treat warnings as errors (exit 1 if there is any)")
    check.set_defaults(run=_check)

    rules = commands.add_parser(
        "rules", help="list the rules: what each reads and when it can fire",
        description="Load rule files (or directories of them) as `check` does and list every "
        "rule, disabled ones too: id, severity, enabled, file:line, form, whether it can signal "
        "as spans arrive, whether it fires on traces without its spans, and the spans and "
        "attributes it reads. The table cuts long `reads` at the terminal's width (100 "
        "columns when not a terminal); JSON has them whole. Errors and exit status as `check`.")
    rules.add_argument("paths", nargs="+", metavar="PATH", help="rule file or directory")
    rules.add_argument("--format", choices=("table", "json"), default="table")
    rules.set_defaults(run=_rules)

    test = commands.add_parser(
        "test", help="run the examples of every rule",
        description="Run each rule's examples and standalone test files (YAML with a 'tests:' "
        "list of {rule, description, violates, spans}, or {rule, description, file, expect} "
        "over a captured OTLP JSON file). An example may also assert its signal's message, "
        "context and offending spans. Exit 1 if any example fails, 2 if the rules cannot be "
        "loaded or --rule names no rule.")
    test.add_argument("paths", nargs="+", metavar="PATH", help="rule/test file or directory")
    test.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    test.add_argument("--rule", action="append", metavar="ID",
                      help="run only this rule's examples and tests (repeatable)")
    test.set_defaults(run=_test)

    replay = commands.add_parser(
        "replay", help="evaluate rules over recorded traces",
        description="Read recorded traces - the collector file exporter's output, either format: "
        "OTLP JSON (one request per line, or one JSON document) or `format: proto` (each "
        "ExportTraceServiceRequest preceded by its length, 4 bytes big-endian), plain, gzip or "
        "zstd, recognised by content - group spans by trace across all sources, evaluate each "
        "trace once, and write one signal per (rule, trace), sorted by rule, time and trace. "
        "Spans no rule names are dropped unread. A per-rule summary goes to stderr. With "
        "--tempo or --jaeger, the traces come from that store instead: those it finds between "
        "--since and --until that could violate a rule, each fetched whole.",
        epilog="Malformed input is reported as FILE:LINE (JSON) or FILE@BYTE-OFFSET (proto, "
        "offset in the decompressed data) and skipped; the rest is replayed. "
        "Exit status: 0 done; 1 violations found with --fail-on-violation; 2 could not run "
        "(bad rules or options, a source that matches nothing or cannot be read, Tempo or "
        "Jaeger unreachable or not answering its API); 3 done, but malformed input was skipped "
        "(with --tempo or --jaeger: or a trace was missing, partial, or a search window still "
        "full); 4 done, but a rule raised on some traces (the summary names it; every other "
        "rule was judged).")
    replay.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="file, directory (read recursively, hidden entries skipped), glob "
                        "(quoted globs are expanded too) or '-' for stdin")
    replay.add_argument("--rules", action="append", required=True, metavar="PATH",
                        help="rule file or directory (repeatable)")
    replay.add_argument("--format", choices=("jsonl", "table", "csv"), default="jsonl")
    replay.add_argument("--out", metavar="FILE", help="write signals here (default: stdout)")
    replay.add_argument("--fail-on-violation", action="store_true",
                        help="exit 1 when any rule fires")
    replay.add_argument("--since", metavar="TIME",
                        help="only traces with a span starting at or after TIME: RFC 3339 "
                        "(2025-02-01T09:30:00Z), a date (UTC), or a duration before now (29d, 6h)")
    replay.add_argument("--until", metavar="TIME",
                        help="only traces with a span starting before TIME")
    replay.add_argument("--edge", metavar="DURATION", default="5m",
                        help="with --since/--until, spans this far outside the range are read "
                        "too, so a trace crossing its edge is evaluated whole (default: 5m)")
    replay.add_argument("--group-by", metavar="ATTRIBUTE",
                        help="break each rule's violations down by this attribute (e.g. "
                        "service.version), read from the offending spans, else any span of the "
                        "trace; a span's own attribute first, then its resource's")
    replay.add_argument("--max-signal-value-bytes", type=int, default=MAX_VALUE_BYTES,
                        metavar="N", help="cut each context value a signal carries at this "
                        f"many bytes, as `serve` does (default: {MAX_VALUE_BYTES})")
    replay.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="processes reading files and evaluating partitions, at most one "
                        f"per source (default: all cores, {os.cpu_count() or 1})")
    replay.add_argument("--memory", metavar="SIZE",
                        help="budget for buffered spans over all processes (K, M, G suffixes; "
                        "default: 640M per process, so each stays under about 1 GB, at most a "
                        "quarter of this machine's memory); beyond it spans are spilled to disk")
    replay.add_argument("--spill-dir", metavar="DIR",
                        help="where to spill (a temp directory is made and always removed; "
                        "default: the system's temp directory)")
    replay.add_argument("--progress", choices=MODES, default="auto",
                        help="progress on stderr: auto (a redrawn line with spans/s and ETA on a "
                        "terminal, else a line every 5 s), bar, lines or never")
    store = replay.add_mutually_exclusive_group()
    store.add_argument("--tempo", metavar="URL",
                       help="read from Tempo instead of files (needs --since): search with a "
                       "TraceQL query compiled from the rules, fetch each candidate trace whole")
    store.add_argument("--jaeger", metavar="URL",
                       help="read from Jaeger's query service (http://HOST:16686) instead of "
                       "files (needs --since): search each service for the span names the rules "
                       "need (every service when a rule needs none), fetch each candidate trace "
                       "whole")
    replay.add_argument("--search-limit", "--tempo-limit", dest="search_limit", type=int,
                        default=1000, metavar="N",
                        help="with --tempo or --jaeger, traces per search request, at most "
                        "the server's (Tempo's max_result_limit, the Jaeger memory store's "
                        "max_traces; default: 1000); fuller windows are split")
    replay.add_argument("--tempo-org-id", metavar="TENANT",
                        help="X-Scope-OrgID for a multi-tenant Tempo")
    replay.add_argument("--signals-db", metavar="URL", default=os.environ.get(
                        "BETRACE_SIGNALS_DB", ""),
                        help="also store the signals in this signal database (sqlite:///PATH or "
                        "postgresql://USER@HOST:PORT/DB), once per signal_id however often "
                        "replayed; query it with `betrace signals` [env BETRACE_SIGNALS_DB]")
    replay.add_argument("--signals-db-password-file", metavar="FILE", default=os.environ.get(
                        "BETRACE_SIGNALS_DB_PASSWORD_FILE", ""),
                        help="file holding the PostgreSQL password (else PGPASSWORD or "
                        "~/.pgpass) [env BETRACE_SIGNALS_DB_PASSWORD_FILE]")
    replay.set_defaults(run=_replay)

    signals = commands.add_parser(
        "signals", help="query the signal database: filter, group, export",
        description="Read signals from the signal database that `serve` and `replay` write "
        "with --signals-db: filter them, newest first, or count them per value of an "
        "attribute (--group-by service.version finds the bad deploy). Times filter when the "
        "violation happened (the latest offending span's start), else when it was detected.",
        epilog="Exit status: 0 done (whether or not anything matched); 2 bad options or the "
        "database cannot be read.")
    _flag(signals, "--signals-db", "URL", "",
          "sqlite:///PATH or postgresql://USER@HOST:PORT/DB (the password from PGPASSWORD, "
          "~/.pgpass or --signals-db-password-file)")
    _flag(signals, "--signals-db-password-file", "FILE", "",
          "file holding the PostgreSQL password (not in the URL, never logged)")
    signals.add_argument("--rule", action="append", default=[], metavar="ID",
                         help="only this rule (repeatable: any of them)")
    signals.add_argument("--severity", action="append", default=[], metavar="LEVEL",
                         help="only this severity (repeatable)")
    signals.add_argument("--service", action="append", default=[], metavar="NAME",
                         help="only signals whose offending span is in this service (repeatable)")
    signals.add_argument("--mode", choices=("live", "replay"), action="append", default=[],
                         help="only signals first detected live or by a replay")
    signals.add_argument("--since", metavar="TIME",
                         help="violations at or after TIME: RFC 3339, a date (UTC), or a "
                         "duration before now (30d, 6h)")
    signals.add_argument("--until", metavar="TIME", help="violations before TIME")
    signals.add_argument("--where", action="append", default=[], metavar="ATTR=VALUE",
                         help="a context attribute (or service.version, trace_id...) equal to "
                         "VALUE; for a list, any element (repeatable: all must hold)")
    signals.add_argument("--group-by", metavar="ATTR",
                         help="count per value of ATTR (a context attribute, or rule, severity, "
                         "service, service.version, mode) with the first and last time")
    signals.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    signals.add_argument("--limit", type=int, metavar="N",
                         help="at most N signals, the newest (default: all)")
    signals.set_defaults(run=_signals)

    ui = commands.add_parser(
        "ui", help="the signal explorer and rule playground: a web page",
        description="Serve a web page over the signal database (opened read-only) and the "
        "rules: the signals with filters, groups, a chart per rule and day, each signal's "
        "detail and trace link, CSV of exactly the filtered rows (links hold the filters); "
        "the rules with their examples and recent signals; a playground that runs a rule over "
        "a sample in a child process, away from every sidecar. No JavaScript.",
        epilog="Exit status: 0 after SIGTERM or Ctrl-C; 2 bad options, rules, or a database "
        "that cannot be read.")
    _flag(ui, "--signals-db", "URL", "", "the signal database to explore (sqlite:///PATH or "
          "postgresql://USER@HOST:PORT/DB)")
    _flag(ui, "--signals-db-password-file", "FILE", "",
          "file holding the PostgreSQL password (else PGPASSWORD or ~/.pgpass)")
    ui.add_argument("--rules", action="append", default=[], metavar="PATH",
                    help="rule file or directory for the rules page (repeatable)")
    _flag(ui, "--listen", "HOST:PORT", "127.0.0.1:9470", "where to serve the page")
    _flag(ui, "--token-file", "FILE", "",
          "every request must present the file's content (Authorization: Bearer, or open the "
          "page once with ?token=...)")
    _flag(ui, "--trace-url", "TEMPLATE", "",
          "link each signal to its trace ({trace_id} is filled in)")
    ui.add_argument("--sample", action="append", default=[], metavar="FILE",
                    help="an OTLP file (JSON or proto, as `replay` reads) the playground offers, "
                    "besides the shipped incident samples (repeatable)")
    _flag(ui, "--log-level", "LEVEL", "info", "debug, info, warning or error")
    ui.set_defaults(run=_ui)

    serve = commands.add_parser(
        "serve", help="run the sidecar: OTLP in, violations out",
        description="Receive spans from the OpenTelemetry Collector over OTLP, assemble traces, "
        "evaluate the rules, and emit violations as spans, metrics and a JSON-lines log. "
        "Every flag can also be set as BETRACE_<FLAG> in the environment (flags win). "
        "SIGHUP reloads the rules; SIGTERM decides every buffered trace and exits.")
    defaults = Settings()
    _flag(serve, "--rules", "PATH", ",".join(defaults.rules),
          "rule file or directory, comma-separated for several (watched for changes)")
    _flag(serve, "--listen", "HOST:PORT", defaults.listen, "OTLP gRPC")
    _flag(serve, "--http-listen", "HOST:PORT", defaults.http_listen, "OTLP/HTTP ('' = off)")
    _flag(serve, "--metrics-listen", "HOST:PORT", defaults.metrics_listen,
          "/metrics, /healthz, /readyz ('' = off)")
    _flag(serve, "--decision-wait", "DURATION", "10s",
          "decide a trace after this long without a new span")
    _flag(serve, "--max-trace-age", "DURATION", "5m", "decide a trace this long after it opened")
    _flag(serve, "--decided-retention", "DURATION", "1m",
          "keep decided traces this long so late spans re-open them whole")
    _flag(serve, "--max-traces", "N", str(defaults.max_traces),
          "traces held; beyond it the oldest open trace is decided early")
    _flag(serve, "--max-spans-per-trace", "N", str(defaults.max_spans_per_trace),
          "spans beyond it are refused (reported as OTLP partial success)")
    _flag(serve, "--max-trace-bytes", "SIZE", f"{defaults.max_trace_bytes // 1024 ** 2}MiB",
          "bytes of spans held per trace (their names, attribute keys and values, and 64 "
          "each; K, M, G suffixes): a span that would take its trace beyond it is refused "
          "(reported as OTLP partial success)")
    _flag(serve, "--max-trace-ids", "N", str(defaults.max_trace_ids),
          "traces held by id alone (none of their spans selected), for rules that fire on "
          "traces without their spans; beyond it they are dropped undecided (counted)")
    _flag(serve, "--signals-out", "FILE|-", "", "append signals as JSON lines ('-' = stdout)")
    _flag(serve, "--export-otlp", "HOST:PORT", "",
          "send violation spans over OTLP gRPC (e.g. back to the collector)")
    _flag(serve, "--export-otlp-ca", "FILE", "",
          "PEM CA verifying the --export-otlp endpoint (implies TLS; an https:// endpoint "
          "without it is verified against the system's roots)")
    _flag(serve, "--export-otlp-headers", "KEY=VALUE,...", "",
          "headers sent with every violation span export, e.g. "
          "'authorization=Bearer%%20TOKEN' (values URL-encoded; prefer the environment)")
    _flag(serve, "--tls-cert", "FILE", "",
          "PEM certificate (chain) served on OTLP gRPC, OTLP/HTTP and metrics ('' = plain "
          "text; reloaded when it changes)")
    _flag(serve, "--tls-key", "FILE", "", "PEM private key of --tls-cert")
    _flag(serve, "--tls-client-ca", "FILE", "",
          "OTLP senders must present a certificate signed by this PEM CA (the metrics port "
          "asks for none, so probes still reach it)")
    _flag(serve, "--otlp-token-file", "FILE", "",
          "OTLP senders must send 'Authorization: Bearer <the file's content>' (reloaded "
          "when it changes; gRPC health checks need none)")
    _flag(serve, "--metrics-token-file", "FILE", "",
          "/metrics needs 'Authorization: Bearer <the file's content>' (/healthz and /readyz "
          "do not, for the kubelet's probes)")
    _flag(serve, "--store", "memory|URL", defaults.store,
          "trace state: memory, or Redis shared by sidecars: redis://[:password@]host:port/db, "
          "rediss:// (TLS), unix:///path, redis+cluster://host:port[,host:port]")
    _flag(serve, "--claim-lease", "DURATION", "30s",
          "with Redis: a trace claimed by a sidecar that dies is decided by another after this")
    _flag(serve, "--reload-interval", "DURATION", "2s", "how often to look for rule changes")
    _flag(serve, "--max-signal-value-bytes", "N", str(defaults.max_signal_value_bytes),
          "cut each context value a signal or violation span carries at this many bytes "
          "(marked; rules always see whole values)")
    _flag(serve, "--signal-budget", "N", f"{defaults.signal_budget:g}",
          "signals a second each rule may write (ten times that at once); beyond, they are "
          "counted and summarised in the log (0 = no budget)")
    _flag(serve, "--http-timeout", "DURATION", "30s",
          "OTLP/HTTP and metrics: a request's body must arrive within this (408 after), its "
          "head within a third of it (the connection is closed)")
    _flag(serve, "--signals-db", "URL", "",
          "also store every signal in this signal database: sqlite:///PATH or "
          "postgresql://USER@HOST:PORT/DB (one row per signal_id; writes are queued and "
          "retried, never in the way of ingest); query it with `betrace signals`")
    _flag(serve, "--signals-db-password-file", "FILE", "",
          "file holding the PostgreSQL password (else PGPASSWORD or ~/.pgpass; never logged)")
    _flag(serve, "--signals-retention", "DURATION", "730d",
          "delete stored signals that occurred longer ago than this, in the background (0 = "
          "keep them for ever)")
    _flag(serve, "--alertmanager", "URL", "",
          "push each signal to this Alertmanager (http://HOST:9093) as an alert (labels "
          "alertname=BetraceViolation, rule, severity, service, signal_id), which routes it to "
          "Slack, PagerDuty, e-mail...; queued, batched and retried")
    _flag(serve, "--alertmanager-resolve-after", "DURATION", "5m",
          "an alert resolves this long after its signal")
    _flag(serve, "--webhook", "URL", "",
          "POST each batch of signals as JSON ({\"signals\": [...]}) to this URL; queued and "
          "retried")
    _flag(serve, "--webhook-secret-file", "FILE", "",
          "sign each webhook body: X-Betrace-Signature: sha256=HMAC-SHA256(the file's "
          "content, body)")
    _flag(serve, "--trace-url", "TEMPLATE", "",
          "link signals to their trace in alerts and webhooks, e.g. "
          "'https://grafana.example/explore?...{trace_id}' ({trace_id} is filled in)")
    _flag(serve, "--log-level", "LEVEL", "info", "debug, info, warning or error")
    serve.set_defaults(run=_serve)

    webhook = commands.add_parser(
        "webhook", help="inject the sidecar into pods: a Kubernetes mutating admission webhook",
        description="Serve a mutating admission webhook over HTTPS (POST /mutate, AdmissionReview "
        "admission.k8s.io/v1; GET /healthz) that adds the sidecar container from "
        "--sidecar-template to Pods labelled or annotated betrace.dev/inject=true (the "
        "annotation 'false' opts out), except in the webhook's own namespace. It never refuses "
        "a pod. The template (YAML, or JSON for *.json) is {container: {...}, volumes: [...]} "
        "and is reloaded when it changes. Every flag can also be set as BETRACE_<FLAG> in the "
        "environment (flags win). SIGTERM stops it.")
    _flag(webhook, "--listen", "HOST:PORT", "0.0.0.0:8443", "HTTPS: POST /mutate, GET /healthz")
    _flag(webhook, "--tls-cert", "FILE", "", "PEM certificate (chain) served (required; "
          "reloaded when it changes)")
    _flag(webhook, "--tls-key", "FILE", "", "PEM private key of --tls-cert (required)")
    _flag(webhook, "--sidecar-template", "FILE", "",
          "YAML/JSON {container: {...}, volumes: [...]} to inject (required; reloaded when it "
          "changes)")
    _flag(webhook, "--metrics-listen", "HOST:PORT", "0.0.0.0:9465",
          "plain HTTP /metrics, /healthz ('' = off)")
    _flag(webhook, "--namespace", "NAMESPACE", os.environ.get("POD_NAMESPACE", ""),
          "the webhook's own namespace, whose pods are never injected (default from "
          "POD_NAMESPACE)")
    _flag(webhook, "--log-level", "LEVEL", "info", "debug, info, warning or error")
    webhook.set_defaults(run=_webhook)

    demo = commands.add_parser(
        "demo", help="show the seven incidents caught by a live sidecar",
        description="Start a sidecar in-process on free loopback ports, send the seven incident "
        "scenarios (violating and clean twins, from the catalog's examples) through the real "
        "OTLP gRPC path with the OpenTelemetry SDK, and print what was caught.")
    demo.add_argument("--rules", default="rules", metavar="PATH",
                      help="rule file or directory (default: rules)")
    demo.add_argument("--decision-wait", default="1s", metavar="DURATION")
    demo.set_defaults(run=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from sidecar.dsl import parse_duration
    from sidecar.live.demo import run_demo

    ruleset = _load([args.rules])
    if ruleset is None:
        return EXIT_UNUSABLE
    try:
        wait = parse_duration(args.decision_wait) / 1e9
    except ValueError as exc:
        print(f"betrace demo: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    return run_demo(ruleset, wait)


def _flag(parser: argparse.ArgumentParser, flag: str, metavar: str, default: str,
          help: str) -> None:
    """A flag whose default comes from BETRACE_<FLAG>, else `default`."""
    env = "BETRACE_" + flag.lstrip("-").replace("-", "_").upper()
    parser.add_argument(flag, metavar=metavar, default=os.environ.get(env, default),
                        help=f"{help} [env {env}; default {default!r}]")


def _logging_to_stderr(command: str, level: str) -> bool:
    """Configure logging for a long-running command; False (after saying why) on a bad level."""
    import logging

    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        print(f"betrace {command}: log-level {level!r} is not one of debug, info, warning, "
              "error", file=sys.stderr)
        return False
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return True


def _serve(args: argparse.Namespace) -> int:
    from sidecar.dsl import parse_duration
    from sidecar.live.app import Sidecar
    from sidecar.live.credentials import CredentialError
    from sidecar.signaldb import SignalDBError

    if not _logging_to_stderr("serve", args.log_level):
        return EXIT_UNUSABLE
    try:
        settings = Settings(
            rules=[p for p in args.rules.split(",") if p],
            listen=args.listen, http_listen=args.http_listen, metrics_listen=args.metrics_listen,
            decision_wait=parse_duration(args.decision_wait) / 1e9,
            max_trace_age=parse_duration(args.max_trace_age) / 1e9,
            decided_retention=parse_duration(args.decided_retention) / 1e9,
            max_traces=int(args.max_traces), max_spans_per_trace=int(args.max_spans_per_trace),
            max_trace_bytes=_size(args.max_trace_bytes, "--max-trace-bytes"),
            max_trace_ids=int(args.max_trace_ids),
            max_signal_value_bytes=int(args.max_signal_value_bytes),
            signal_budget=float(args.signal_budget),
            signals_out=args.signals_out or None, export_otlp=args.export_otlp or None,
            store=args.store, claim_lease=parse_duration(args.claim_lease) / 1e9,
            reload_interval=parse_duration(args.reload_interval) / 1e9,
            http_timeout=parse_duration(args.http_timeout) / 1e9,
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
            otlp_token_file=args.otlp_token_file, metrics_token_file=args.metrics_token_file,
            export_otlp_ca=args.export_otlp_ca, export_otlp_headers=args.export_otlp_headers,
            signals_db=args.signals_db, signals_db_password_file=args.signals_db_password_file,
            signals_retention=_retention(args.signals_retention),
            alertmanager=args.alertmanager,
            alertmanager_resolve_after=parse_duration(args.alertmanager_resolve_after) / 1e9,
            webhook=args.webhook, webhook_secret_file=args.webhook_secret_file,
            trace_url=args.trace_url)
    except ValueError as exc:
        print(f"betrace serve: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    problems = settings.validate()
    if problems:
        for problem in problems:
            print(f"betrace serve: {problem}", file=sys.stderr)
        return EXIT_UNUSABLE
    ruleset = _load(settings.rules)
    if ruleset is None:
        return EXIT_UNUSABLE
    try:
        return Sidecar(settings, ruleset).serve_forever()
    except (OSError, IncompatibleStore, CredentialError, SignalDBError) as exc:
        print(f"betrace serve: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE


def _signals(args: argparse.Namespace) -> int:
    from sidecar.model.errors import SourceError
    from sidecar.model.moments import parse_moment
    from sidecar.model.signals import rfc3339
    from sidecar.signaldb import SignalDBError, SignalQuery
    from sidecar.signaldb.report import write_groups, write_signals

    try:
        if not args.signals_db:
            raise ValueError("--signals-db URL (or BETRACE_SIGNALS_DB) is required")
        where = []
        for item in args.where:
            key, equals, value = item.partition("=")
            if not equals or not key:
                raise ValueError(f"--where {item!r}: expected ATTR=VALUE")
            where.append((key, value))
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, not {args.limit}")
        query = SignalQuery(
            rules=tuple(args.rule), severities=tuple(args.severity),
            services=tuple(args.service), modes=tuple(args.mode),
            since=rfc3339(parse_moment(args.since)) if args.since else None,
            until=rfc3339(parse_moment(args.until)) if args.until else None,
            where=tuple(where), limit=args.limit)
        db = _signal_db(args.signals_db, args.signals_db_password_file)
    except (ValueError, SourceError, SignalDBError) as exc:
        print(f"betrace signals: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        if args.group_by:
            write_groups(db.groups(query, args.group_by), args.group_by, args.format,
                         sys.stdout)
        else:
            write_signals(db.signals(query), args.format, sys.stdout,
                          db.context_keys(query) if args.format == "csv" else ())
    except SignalDBError as exc:
        print(f"betrace signals: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    finally:
        db.close()
    return EXIT_OK


def _ui(args: argparse.Namespace) -> int:
    import logging

    from aiohttp import web

    from sidecar.live.config import split_address
    from sidecar.live.credentials import CredentialError, read_secret
    from sidecar.model.signals import trace_url_problem
    from sidecar.signaldb import SignalDBError, read_password
    from sidecar.ui.app import DATABASE, UiSettings, make_app

    if not _logging_to_stderr("ui", args.log_level):
        return EXIT_UNUSABLE
    try:
        if not args.signals_db:
            raise ValueError("--signals-db URL (or BETRACE_SIGNALS_DB) is required")
        if args.trace_url and (problem := trace_url_problem(args.trace_url)):
            raise ValueError(f"--trace-url {problem}")
        host, port = split_address(args.listen)
        settings = UiSettings(
            signals_db=args.signals_db,
            password=read_password(args.signals_db_password_file)
            if args.signals_db_password_file else None,
            rules=tuple(args.rules), trace_url=args.trace_url, samples=tuple(args.sample),
            token=read_secret(args.token_file, "token") if args.token_file else None)
        app = make_app(settings)
    except RuleLoadError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return EXIT_UNUSABLE
    except (ValueError, SignalDBError, CredentialError) as exc:
        print(f"betrace ui: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if host not in ("127.0.0.1", "::1", "localhost") and settings.token is None:
        logging.getLogger("sidecar.ui").warning(
            "listening on %s without --token-file: anyone who reaches it reads every signal",
            host)
    web.run_app(app, host=host, port=port, access_log=None, handle_signals=True,
                print=lambda _: logging.getLogger("sidecar.ui").info(
                    "betrace ui listening on http://%s:%d/ (signals from %s)", host, port,
                    app[DATABASE]))
    return EXIT_OK


def _signal_db(url: str, password_file: str) -> Any:
    """The signal database `url` names, its password read from `password_file` if given
    (raises ValueError for a bad URL, SignalDBError for an unreadable password file)."""
    from sidecar.signaldb import open_signal_db, read_password

    return open_signal_db(url, read_password(password_file) if password_file else None)


def _webhook(args: argparse.Namespace) -> int:
    from sidecar.k8s.webhook import Webhook, WebhookError, WebhookSettings
    from sidecar.live.credentials import CredentialError

    if not _logging_to_stderr("webhook", args.log_level):
        return EXIT_UNUSABLE
    settings = WebhookSettings(
        tls_cert=args.tls_cert, tls_key=args.tls_key, sidecar_template=args.sidecar_template,
        listen=args.listen, metrics_listen=args.metrics_listen, namespace=args.namespace)
    problems = settings.validate()
    if problems:
        for problem in problems:
            print(f"betrace webhook: {problem}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        webhook = Webhook(settings)
    except (WebhookError, CredentialError) as exc:
        print(f"betrace webhook: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        return webhook.serve_forever()
    except OSError as exc:
        print(f"betrace webhook: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE


def _load(paths: Sequence[str]) -> RuleSet | None:
    """Rules, or None after printing every error to stderr."""
    try:
        return load_rules(paths)
    except RuleLoadError as exc:
        print(exc, file=sys.stderr)
        print(f"betrace: {len(exc.errors)} error(s) in rules; nothing was run", file=sys.stderr)
        return None


def _checked(paths: Sequence[str], as_json: bool) -> RuleSet | None:
    """Rules, or None after reporting every error on stdout, as text or JSON: what `check`
    prints, and `rules` too."""
    try:
        return load_rules(paths)
    except RuleLoadError as exc:
        if as_json:
            print(json.dumps({"ok": False, "errors": [e.as_dict() for e in exc.errors]},
                             indent=2))
        else:
            print(exc)
            print(f"{len(exc.errors)} error(s)")
        return None


def _check(args: argparse.Namespace) -> int:
    ruleset = _checked(args.paths, args.format == "json")
    if ruleset is None:
        return EXIT_FAILED
    rules = len(ruleset.rules) + len(ruleset.disabled)
    warnings = ruleset.warnings()
    refused = args.strict and bool(warnings)
    if args.format == "json":
        print(json.dumps({"ok": not refused, "files": list(ruleset.files), "rules": rules,
                          "enabled": len(ruleset.rules), "digest": ruleset.digest,
                          "errors": [], "warnings": [w.as_dict() for w in warnings],
                          "strict": args.strict}, indent=2))
    else:
        for warning in warnings:
            print(warning, file=sys.stderr)
        if refused:
            print(f"{len(warnings)} warning(s), made errors by --strict")
        else:
            print(f"ok: {rules} rule(s) ({len(ruleset.disabled)} disabled) in "
                  f"{len(ruleset.files)} file(s)" + (f", {len(warnings)} warning(s)"
                                                      if warnings else ""))
    return EXIT_FAILED if refused else EXIT_OK


def _rules(args: argparse.Namespace) -> int:
    from sidecar.rules.listing import as_json, table

    ruleset = _checked(args.paths, args.format == "json")
    if ruleset is None:
        return EXIT_FAILED
    if args.format == "json":
        print(as_json(ruleset))
    else:
        for line in table(ruleset, shutil.get_terminal_size((100, 24)).columns):
            print(line)
    return EXIT_OK


def _test(args: argparse.Namespace) -> int:
    from sidecar.replay.runner import replay_one_rule
    from sidecar.rules.examples import only_rules, report, run_examples, write_junit

    ruleset = _load(args.paths)
    if ruleset is None:
        return EXIT_UNUSABLE
    if args.rule:
        try:
            ruleset = only_rules(ruleset, args.rule)
        except ValueError as exc:
            print(f"betrace test: {exc}", file=sys.stderr)
            return EXIT_UNUSABLE
    results = run_examples(ruleset, replay_one_rule)
    for line in report(ruleset, results):
        print(line)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed}/{len(results)} examples passed")
    if args.junit:
        write_junit(results, args.junit)
    return EXIT_FAILED if failed else EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    import signal

    from sidecar.model.errors import SourceError
    from sidecar.model.moments import parse_moment
    from sidecar.model.signal_writers import make_writer
    from sidecar.model.signals import Signal
    from sidecar.replay.backend import BackendError, TraceBackend
    from sidecar.replay.jaeger import JaegerClient
    from sidecar.replay.progress import Progress
    from sidecar.replay.runner import ReplayOptions, replay, replay_backend
    from sidecar.replay.sources import expand_sources
    from sidecar.replay.tempo import TempoClient
    from sidecar.signaldb import SignalDBError
    from sidecar.signaldb.writer import SignalDBSink

    signal.signal(signal.SIGTERM, _terminated)
    ruleset = _load(args.rules)
    if ruleset is None:
        return EXIT_UNUSABLE
    try:
        store = "--tempo" if args.tempo else "--jaeger" if args.jaeger else None
        if store and args.sources:
            raise SourceError(f"give either SOURCE files or {store}, not both")
        if not store and not args.sources:
            raise SourceError("nothing to replay: give SOURCE files (or '-'), --tempo URL or "
                              "--jaeger URL")
        if store and not args.since:
            raise SourceError(f"{store} needs --since (and --until, default now): the store is "
                              "searched over a time range")
        if args.search_limit < 1:
            raise SourceError(f"--search-limit must be at least 1, not {args.search_limit}")
        backend: TraceBackend[Any] | None = None
        if args.tempo:
            backend = TempoClient(args.tempo, org_id=args.tempo_org_id)
        elif args.jaeger:
            backend = JaegerClient(args.jaeger)
        sources = expand_sources(args.sources) if args.sources else []
        until = parse_moment(args.until) if args.until else None
        options = ReplayOptions(
            memory=_size(args.memory, "--memory") if args.memory else None,
            jobs=args.jobs,
            spill_dir=args.spill_dir,
            since_ns=parse_moment(args.since) if args.since else None,
            until_ns=until if until is not None or backend is None else time.time_ns(),
            edge_ns=_edge(args.edge), group_by=args.group_by,
            value_limit=args.max_signal_value_bytes)
        if options.value_limit < 1:
            raise SourceError("--max-signal-value-bytes must be at least 1")
        if options.jobs < 1:
            raise SourceError(f"--jobs must be at least 1, not {options.jobs}")
        if options.spill_dir is not None and not os.path.isdir(options.spill_dir):
            raise SourceError(f"--spill-dir {options.spill_dir}: no such directory")
        if options.since_ns is not None and options.until_ns is not None \
                and options.since_ns >= options.until_ns:
            raise SourceError("--since must be before --until")
        database = SignalDBSink(_signal_db(args.signals_db, args.signals_db_password_file)) \
            if args.signals_db else None
    except (SourceError, ValueError, SignalDBError) as exc:
        print(f"betrace: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    progress = Progress(args.progress, sum(os.path.getsize(s) for s in sources if s != "-"))
    out: IO[str] = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        columns = sorted({c for rule in ruleset.rules for c in rule.context})
        writers = [make_writer(args.format, out, columns), *([database] if database else [])]

        def write(signal: Signal) -> None:
            for writer in writers:
                writer.write(signal)

        def report(error: object) -> None:
            print(f"betrace: {error}", file=sys.stderr)
        if backend is not None:
            summary = replay_backend(ruleset, backend, write, on_error=report,
                                     options=options, limit=args.search_limit,
                                     progress=progress)
        else:
            summary = replay(ruleset, sources, write, on_error=report, options=options,
                             progress=progress)
        for writer in writers:
            writer.close()
    except BrokenPipeError:
        raise  # the reader went away (`| head`): main() ends quietly
    except (OSError, BackendError, SignalDBError) as exc:
        progress.clear()
        print(f"betrace: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    finally:
        if args.out:
            out.close()
        if database is not None:
            database.db.close()
    if database is not None:
        print(f"signals stored in {database.db.target}: {database.stored}", file=sys.stderr)
    for line in summary.lines() + (backend.stats.lines() if backend is not None else []):
        print(line, file=sys.stderr)
    if args.fail_on_violation and summary.signals:
        return EXIT_FAILED
    if summary.rule_errors:
        return EXIT_RULE_ERRORS
    incomplete = backend is not None and backend.stats.incomplete
    return EXIT_SKIPPED_INPUT if summary.skipped or incomplete else EXIT_OK


def _edge(text: str) -> int:
    from sidecar.dsl import parse_duration
    from sidecar.model.errors import SourceError

    try:
        return parse_duration(text)
    except ValueError:
        raise SourceError(f"invalid --edge {text!r}: expected a duration such as 5m or 30s") \
            from None


def _retention(text: str) -> float:
    """`730d`, `52w`, `12h`, or `0` (keep for ever): seconds."""
    from sidecar.model.moments import duration_ns

    if text.strip() == "0":
        return 0.0
    nanoseconds = duration_ns(text)
    if nanoseconds is None:
        raise ValueError(f"invalid --signals-retention {text!r}: expected a duration such as "
                         "730d, 52w or 12h, or 0 (keep for ever)")
    return nanoseconds / 1e9


def _size(text: str, flag: str) -> int:
    """`512M`, `2G`, `1.5G`, `65536`: bytes (binary units; a trailing B or iB is allowed)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"invalid {flag} {text!r}: expected a size such as 512M or 2G")
    return max(1, int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")))

"""The `betrace` command line: it only wires arguments to the objects that do the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import IO

from sidecar import __version__
from sidecar.errors import RuleLoadError
from sidecar.rules import RuleSet, load_rules
from sidecar.config import Settings

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE, EXIT_SKIPPED_INPUT = 0, 1, 2, 3


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
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="betrace", description="Behavioral assurance for OpenTelemetry: invariants as "
        "rules over traces.")
    parser.add_argument("--version", action="version", version=f"betrace {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    check = commands.add_parser(
        "check", help="validate rule files and report every error",
        description="Load rule files (or directories of them) and report every error with "
        "file:line:column. Exit 1 if there is any error.")
    check.add_argument("paths", nargs="+", metavar="PATH", help="rule file or directory")
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.set_defaults(run=_check)

    test = commands.add_parser(
        "test", help="run the examples of every rule",
        description="Run each rule's examples and standalone test files (YAML with a 'tests:' "
        "list of {rule, description, violates, spans}). Exit 1 if any example fails.")
    test.add_argument("paths", nargs="+", metavar="PATH", help="rule/test file or directory")
    test.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    test.set_defaults(run=_test)

    replay = commands.add_parser(
        "replay", help="evaluate rules over recorded traces",
        description="Read OTLP JSON traces (the collector file exporter's output: one request "
        "per line, or one JSON document; .gz too; '-' for stdin), group spans by trace across "
        "all sources, evaluate each trace once, and write one signal per (rule, trace).",
        epilog="exit status: 0 done; 1 violations found with --fail-on-violation; 2 could not "
        "run (bad rules, unreadable source); 3 done, but malformed input was skipped.")
    replay.add_argument("sources", nargs="+", metavar="SOURCE", help="OTLP JSON file or '-'")
    replay.add_argument("--rules", action="append", required=True, metavar="PATH",
                        help="rule file or directory (repeatable)")
    replay.add_argument("--format", choices=("jsonl", "table", "csv"), default="jsonl")
    replay.add_argument("--out", metavar="FILE", help="write signals here (default: stdout)")
    replay.add_argument("--fail-on-violation", action="store_true",
                        help="exit 1 when any rule fires")
    replay.set_defaults(run=_replay)

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
    _flag(serve, "--signals-out", "FILE|-", "", "append signals as JSON lines ('-' = stdout)")
    _flag(serve, "--export-otlp", "HOST:PORT", "",
          "send violation spans over OTLP gRPC (e.g. back to the collector)")
    _flag(serve, "--store", "memory|URL", defaults.store,
          "trace state: memory, or Redis shared by sidecars: redis://[:password@]host:port/db, "
          "rediss:// (TLS), unix:///path, redis+cluster://host:port[,host:port]")
    _flag(serve, "--claim-lease", "DURATION", "30s",
          "with Redis: a trace claimed by a sidecar that dies is decided by another after this")
    _flag(serve, "--reload-interval", "DURATION", "2s", "how often to look for rule changes")
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
    from sidecar.demo import run_demo
    from sidecar.dsl import parse_duration

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
    from sidecar.serve import Sidecar

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
            signals_out=args.signals_out or None, export_otlp=args.export_otlp or None,
            store=args.store, claim_lease=parse_duration(args.claim_lease) / 1e9,
            reload_interval=parse_duration(args.reload_interval) / 1e9)
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
    except OSError as exc:
        print(f"betrace serve: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE


def _webhook(args: argparse.Namespace) -> int:
    from sidecar.webhook import Webhook, WebhookError, WebhookSettings

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
    except WebhookError as exc:
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


def _check(args: argparse.Namespace) -> int:
    try:
        ruleset = load_rules(args.paths)
    except RuleLoadError as exc:
        if args.format == "json":
            print(json.dumps({"ok": False, "errors": [e.as_dict() for e in exc.errors]},
                             indent=2))
        else:
            print(exc)
            print(f"{len(exc.errors)} error(s)")
        return EXIT_FAILED
    rules = len(ruleset.rules) + len(ruleset.disabled)
    if args.format == "json":
        print(json.dumps({"ok": True, "files": list(ruleset.files), "rules": rules,
                          "enabled": len(ruleset.rules), "digest": ruleset.digest,
                          "errors": []}, indent=2))
    else:
        print(f"ok: {rules} rule(s) ({len(ruleset.disabled)} disabled) in "
              f"{len(ruleset.files)} file(s)")
    return EXIT_OK


def _test(args: argparse.Namespace) -> int:
    from sidecar.rule_tests import report, run_examples, write_junit

    ruleset = _load(args.paths)
    if ruleset is None:
        return EXIT_UNUSABLE
    results = run_examples(ruleset)
    for line in report(ruleset, results):
        print(line)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed}/{len(results)} examples passed")
    if args.junit:
        write_junit(results, args.junit)
    return EXIT_FAILED if failed else EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    from sidecar.replay import replay
    from sidecar.sinks import make_writer

    ruleset = _load(args.rules)
    if ruleset is None:
        return EXIT_UNUSABLE
    missing = [s for s in args.sources if s != "-" and not os.path.isfile(s)]
    if missing:
        for source in missing:
            print(f"betrace: {source}: no such file", file=sys.stderr)
        return EXIT_UNUSABLE
    out: IO[str] = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        columns = sorted({c for rule in ruleset.rules for c in rule.context})
        writer = make_writer(args.format, out, columns)
        summary = replay(ruleset, args.sources, writer.write,
                         on_error=lambda e: print(f"betrace: {e}", file=sys.stderr))
        writer.close()
    except BrokenPipeError:
        raise  # the reader went away (`| head`): main() ends quietly
    except OSError as exc:
        print(f"betrace: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    finally:
        if args.out:
            out.close()
    for line in summary.lines():
        print(line, file=sys.stderr)
    if args.fail_on_violation and summary.signals:
        return EXIT_FAILED
    return EXIT_SKIPPED_INPUT if summary.errors else EXIT_OK

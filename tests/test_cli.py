"""The `betrace` command line, run for real: `python -m sidecar` (and the installed console script)
as a subprocess, with files written by the tests and the bundled sample."""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from sidecar.rules import load_rules

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "rules"
SAMPLE = RULES_DIR / "samples" / "incidents.otlp.jsonl"
EXPECTED = RULES_DIR / "samples" / "expected.json"

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE, EXIT_SKIPPED_INPUT = 0, 1, 2, 3
SIGNAL_FIELDS = {"signal_id", "rule_id", "rule_name", "severity", "trace_id", "span_ids",
                 "message", "context", "mode", "detected_at", "violation_time", "service",
                 "service_version"}
LOCATION = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?P<column>\d+): error\[", re.M)
WARNING = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?P<column>\d+): "
                     r"warning\[(?P<code>[a-z-]+)\]: (?P<message>.+)$")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}


def betrace(*args: str | Path, stdin: bytes | None = None, command: list[str] | None = None,
            columns: int = 100) -> subprocess.CompletedProcess[str]:
    """Run it as a user would, in a terminal `columns` wide (tables fit themselves to it)."""
    argv = (command or [sys.executable, "-m", "sidecar"]) + [str(a) for a in args]
    result = subprocess.run(argv, cwd=REPO, input=stdin, capture_output=True, timeout=120,
                            env={**_env(), "COLUMNS": str(columns)})
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


def warning_lines(stderr: str) -> list[re.Match[str]]:
    """Each line of `check`'s stderr, which must all be warnings."""
    found = [(line, WARNING.match(line)) for line in stderr.splitlines()]
    assert all(match for _, match in found), stderr
    return [match for _, match in found if match]


def subcommands() -> list[str]:
    """The commands `betrace --help` lists."""
    out = betrace("--help").stdout
    section = out.split("commands:", 1)[1]
    return re.findall(r"^    (\w+)\s", section, re.M)


# --- help and the console script ----------------------------------------------------------------

def test_help_lists_the_commands() -> None:
    result = betrace("--help")
    assert result.returncode == EXIT_OK
    assert result.stdout.startswith("usage: betrace ")
    assert {"check", "test", "replay"} <= set(subcommands())


@pytest.mark.parametrize("command", ["check", "rules", "test", "replay", "serve", "demo"])
def test_help_of_every_subcommand(command: str) -> None:
    if command not in subcommands():
        pytest.skip(f"`betrace {command}` is not there yet")
    result = betrace(command, "--help")
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith(f"usage: betrace {command} ")
    assert result.stderr == ""


def test_no_command_prints_help_and_fails() -> None:
    result = betrace()
    assert result.returncode == EXIT_UNUSABLE
    assert result.stdout.startswith("usage: betrace ")


def test_unknown_flag_is_a_usage_error() -> None:
    result = betrace("check", "--no-such-flag", "rules/")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "betrace"
    assert script.exists(), "pip install -e . installs the `betrace` console script"
    result = betrace("check", "rules/", command=[str(script)])
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert result.stdout == betrace("check", "rules/").stdout
    version = betrace("--version", command=[str(script)])
    assert version.returncode == EXIT_OK
    assert re.fullmatch(r"betrace \d+\.\d+\.\d+\S*\n", version.stdout)


# --- check --------------------------------------------------------------------------------------

def test_check_shipped_rules() -> None:
    result = betrace("check", "rules/")
    loaded = load_rules([RULES_DIR])
    count = len(loaded.rules) + len(loaded.disabled)
    warnings = loaded.warnings()
    assert result.returncode == EXIT_OK, result.stdout
    assert result.stdout == (f"ok: {count} rule(s) ({len(loaded.disabled)} disabled) in "
                             f"{len(loaded.files)} file(s)"
                             + (f", {len(warnings)} warning(s)" if warnings else "") + "\n")
    assert [m["code"] for m in warning_lines(result.stderr)] == [w.code for w in warnings]
    # Every catalog rule has examples, uses its declarations and names only spans its examples
    # show; what it warns about is a deliberate "*" (a 5xx on any server span).
    assert [w.code for w in warnings] == ["keeps-every-span"]


def test_check_shipped_rules_json() -> None:
    result = betrace("check", "--format", "json", "rules/")
    assert result.returncode == EXIT_OK
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["errors"] == []
    loaded = load_rules([RULES_DIR])
    assert report["rules"] == len(loaded.rules) + len(loaded.disabled)
    assert re.fullmatch(r"[0-9a-f]{64}", report["digest"])


WARNED = """\
lists:
  currencies: [USD, EUR]
  unused_list: [a]
macros:
  retried: payment.charge.where(attempt > 1)
  unused_macro: amount > 5
rules:
  - id: retry-refunded
    condition: retryed and refund.issued
    examples:
      - {violates: false, spans: [{name: refund.issued}]}
  - id: any-error
    condition: '"*".where(status == ERROR and currency in currencies)'
    examples:
      - {violates: true, spans: [{name: checkout, status: ERROR, attributes: {currency: USD}}]}
  - id: no-audit
    condition: not audit.log
    examples:
      - {violates: true, spans: [{name: checkout}]}
  - id: refunded-twice
    condition: count(refund.issued) > 1
"""
# (line, code, rule id, what the message says) of each warning WARNED gives, in file order
WARNED_EXPECTED = [
    (3, "unused-list", None, "list 'unused_list' is declared but no rule uses it"),
    (5, "unused-macro", None, "macro 'retried' is declared but no rule uses it"),
    (6, "unused-macro", None, "macro 'unused_macro' is declared but no rule uses it"),
    (8, "lone-selector", "retry-refunded", "rule 'retry-refunded' selects span 'retryed', which "
     "no other rule and no example span names; did you mean the macro 'retried'?"),
    (12, "keeps-every-span", "any-error", "rule 'any-error' selects \"*\", which matches every "
     "span name: pruning is off and every span of every trace is kept until decided"),
    (16, "fires-without-spans", "no-audit", "rule 'no-audit' fires on every trace without the "
     "spans it names"),
    (16, "lone-selector", "no-audit", "rule 'no-audit' selects span 'audit.log', which no other "
     "rule and no example span names; is it misspelt?"),
    (20, "no-examples", "refunded-twice", "rule 'refunded-twice' has no examples"),
]


def test_check_warns_on_stderr_one_located_line_each_and_exits_0(tmp_path: Path) -> None:
    rules = tmp_path / "warned.yaml"
    rules.write_text(WARNED)
    result = betrace("check", rules)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert result.stdout == "ok: 4 rule(s) (0 disabled) in 1 file(s), 8 warning(s)\n"
    found = warning_lines(result.stderr)
    assert [(m["file"], int(m["line"]), int(m["column"]), m["code"]) for m in found] == [
        (str(rules), line, 3 if rule is None else 5, code)
        for line, code, rule, _ in WARNED_EXPECTED]
    for match, (*_, message) in zip(found, WARNED_EXPECTED):
        assert match["message"].startswith(message), match["message"]


def test_check_strict_makes_warnings_errors(tmp_path: Path) -> None:
    rules = tmp_path / "warned.yaml"
    rules.write_text(WARNED)
    result = betrace("check", "--strict", rules)
    assert result.returncode == EXIT_FAILED
    assert result.stdout == "8 warning(s), made errors by --strict\n"
    assert len(result.stderr.splitlines()) == 8
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "ok.yaml").write_text("rules:\n  - id: r1\n    condition: count(a) > 1\n"
                                   "    examples:\n      - {violates: false, spans: [{name: a}]}\n")
    quiet = betrace("check", "--strict", clean)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (
        EXIT_OK, "ok: 1 rule(s) (0 disabled) in 1 file(s)\n", "")


def test_check_json_lists_the_warnings(tmp_path: Path) -> None:
    rules = tmp_path / "warned.yaml"
    rules.write_text(WARNED)
    result = betrace("check", "--format", "json", rules)
    assert result.returncode == EXIT_OK
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["errors"] == [] and report["strict"] is False
    assert [(w["file"], w["line"], w["code"], w["rule_id"]) for w in report["warnings"]] == [
        (str(rules), line, code, rule) for line, code, rule, _ in WARNED_EXPECTED]
    assert all(w["message"].startswith(message)
               for w, (*_, message) in zip(report["warnings"], WARNED_EXPECTED))
    strict = betrace("check", "--format", "json", "--strict", rules)
    assert strict.returncode == EXIT_FAILED
    refused = json.loads(strict.stdout)
    assert refused["ok"] is False and refused["strict"] is True
    assert refused["warnings"] == report["warnings"]


BAD = """\
rules:
  - id: payment-retry
    condition: |
      trace.has(payment.charge).where(attempt > 1)
        and count(payment.charge).where(payment_intent_id = unique) > 1
  - id: Bad_Id
    severity: urgent
    condition: trace.has(a)
"""


def test_check_bad_file_reports_every_error_with_file_line_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    result = betrace("check", bad)
    assert result.returncode == EXIT_FAILED
    places = [(m["file"], int(m["line"]), int(m["column"]))
              for m in LOCATION.finditer(result.stdout)]
    assert places == [(str(bad), 5, 59), (str(bad), 6, 9), (str(bad), 7, 15)]
    assert f"{bad}:5:59: error[syntax]: unexpected character '='" in result.stdout
    assert (" 5 |         and count(payment.charge).where(payment_intent_id = unique) > 1\n"
            "   |                                                           ^\n") in result.stdout
    assert result.stdout.endswith("3 error(s)\n")


def test_check_json_format(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    result = betrace("check", "--format", "json", bad)
    assert result.returncode == EXIT_FAILED
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [(e["file"], e["line"], e["column"], e["code"], e["rule_id"])
            for e in report["errors"]] == [
        (str(bad), 5, 59, "syntax", "payment-retry"),
        (str(bad), 6, 9, "bad-id", "Bad_Id"),
        (str(bad), 7, 15, "bad-severity", None),
    ]
    assert all(isinstance(e["message"], str) and e["message"] for e in report["errors"])


def test_check_collects_errors_from_several_files(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text("rules:\n  - id: r1\n    when: trace.has(a)\n")
    (tmp_path / "two.yaml").write_text("rules:\n  - id: r1\n    condition: trace.has(b)\n")
    (tmp_path / "three.yaml").write_text("rules: [\n")
    missing = tmp_path / "missing.yaml"
    result = betrace("check", "--format", "json", tmp_path, missing)
    assert result.returncode == EXIT_FAILED
    found = sorted((Path(e["file"]).name, e["line"], e["code"])
                   for e in json.loads(result.stdout)["errors"])
    # r1 is defined twice even though its first definition is itself wrong
    assert found == [("missing.yaml", 0, "io"), ("one.yaml", 3, "missing-always-never"),
                     ("three.yaml", 2, "yaml"), ("two.yaml", 2, "duplicate-id")]


def test_check_missing_path(tmp_path: Path) -> None:
    result = betrace("check", tmp_path / "nope.yaml")
    assert result.returncode == EXIT_FAILED
    assert result.stdout == (f"{tmp_path / 'nope.yaml'}: error[io]: no such file or directory\n"
                             "1 error(s)\n")


# --- rules --------------------------------------------------------------------------------------

def test_rules_lists_the_catalog_as_json() -> None:
    result = betrace("rules", "--format", "json", "rules/")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    listing = json.loads(result.stdout)
    loaded = load_rules([RULES_DIR])
    assert listing["digest"] == json.loads(betrace("check", "--format", "json", "rules/")
                                           .stdout)["digest"]
    rules = {rule["id"]: rule for rule in listing["rules"]}
    assert len(rules) == len(listing["rules"])
    assert set(rules) == {r.id for r in loaded.rules + loaded.disabled}
    for rule in listing["rules"]:
        assert list(rule) == ["id", "severity", "enabled", "file", "line", "form", "reads",
                              "on_arrival", "fires_without_its_spans"]
        text = (REPO / rule["file"]).read_text().splitlines()[rule["line"] - 1]
        assert text.strip() == f"- id: {rule['id']}", (rule["id"], text)
    payment = rules["payment-retry-idempotency"]
    assert (payment["severity"], payment["enabled"], payment["form"]) == (
        "critical", True, "for_each+never")
    assert payment["reads"] == [{"span": "payment.charge", "glob": False,
                                 "attributes": ["attempt", "cart.id", "payment_intent_id"]}]
    assert payment["on_arrival"] is True  # a second intent of the cart stays there
    audit = rules["admin-action-audit-log"]
    assert audit["form"] == "for_each+always"
    assert audit["on_arrival"] is False  # an audit.log still in flight would clear it
    assert {r["span"]: r["glob"] for r in rules["http-5xx-without-error-log"]["reads"]} == {
        "*": True, "exception": False, "log.error": False}
    assert not any(rule["fires_without_its_spans"] for rule in listing["rules"])


def test_rules_table_of_the_catalog() -> None:
    loaded = load_rules([RULES_DIR])
    wide = betrace("rules", "rules/", columns=250)
    assert wide.returncode == EXIT_OK, wide.stdout + wide.stderr
    header, *lines = wide.stdout.splitlines()
    assert header.split() == ["RULE", "SEVERITY", "ENABLED", "FORM", "ARRIVAL", "EMPTY", "AT",
                              "READS"]
    assert sorted(line.split()[0] for line in lines) == sorted(
        r.id for r in loaded.rules + loaded.disabled)
    [payment] = [line for line in lines if line.startswith("payment-retry-idempotency ")]
    assert payment.split() == ["payment-retry-idempotency", "critical", "yes", "for_each+never",
                               "yes", "no", "rules/payments.yaml:7",
                               "payment.charge(attempt,cart.id,payment_intent_id)"]
    columns = {header.index(name) for name in ("SEVERITY", "FORM", "AT", "READS")}
    assert all(line[column - 2:column - 1] == " " and line[column] != " "
               for line in lines for column in columns), "columns are aligned"
    [http] = [line for line in lines if line.startswith("http-5xx-without-error-log ")]
    assert http.endswith(' "*"(http.response.status_code,http.route,http.status_code,kind)'
                         " exception log.error")
    narrow = betrace("rules", "rules/", columns=100).stdout.splitlines()
    assert [line.split()[:7] for line in narrow] == [line.split()[:7] for line in wide.stdout
                                                      .splitlines()]
    assert any(line.endswith("…") for line in narrow)
    assert all(line.endswith("…") or line in wide.stdout.splitlines() for line in narrow)


FORMS = """rules:
  - id: quiet
    severity: low
    enabled: false
    condition: count("GET /users/*").where(http.status_code >= 500) > 0
  - name: Health is checked
    id: health-checked
    condition: not health.check
  - id: refund-unless-fraud
    when: refund.issued
    never: fraud.flag.where(score > 90)
  - id: admin-audited-never-twice
    never: count(audit.log) > 1
    when: admin.action
    always: audit.log.where(status != ERROR)
"""


def test_rules_forms_disabled_rules_and_rules_without_their_spans(tmp_path: Path) -> None:
    (tmp_path / "forms.yaml").write_text(FORMS)
    result = betrace("rules", "--format", "json", tmp_path)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    listing = json.loads(result.stdout)["rules"]
    assert [(r["id"], r["enabled"], r["line"], r["form"], r["on_arrival"],
             r["fires_without_its_spans"]) for r in listing] == [
        ("quiet", False, 2, "condition", True, False),
        ("health-checked", True, 6, "condition", False, True),
        ("refund-unless-fraud", True, 9, "when+never", True, False),
        ("admin-audited-never-twice", True, 12, "when+always+never", False, False),
    ]
    assert listing[0]["reads"] == [{"span": "GET /users/*", "glob": True,
                                    "attributes": ["http.status_code"]}]
    assert listing[1]["severity"] == "medium"  # the default
    table = betrace("rules", tmp_path, columns=250).stdout.splitlines()
    assert table[1].split()[:3] == ["quiet", "low", "no"]
    assert table[1].endswith(' "GET /users/*"(http.status_code)')
    assert table[2].split()[4:6] == ["no", "yes"]


def test_rules_with_bad_or_missing_files_fail_as_check_does(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    for paths in ([bad], [tmp_path / "nope.yaml"], [RULES_DIR, bad]):
        for listing_format, check_format in (("table", "text"), ("json", "json")):
            listed = betrace("rules", "--format", listing_format, *paths)
            checked = betrace("check", "--format", check_format, *paths)
            assert listed.returncode == checked.returncode == EXIT_FAILED
            assert (listed.stdout, listed.stderr) == (checked.stdout, checked.stderr)
            assert listed.stdout.endswith(" error(s)\n") if listing_format == "table" else \
                json.loads(listed.stdout)["ok"] is False


# --- test ---------------------------------------------------------------------------------------

def test_test_shipped_rules() -> None:
    result = betrace("test", "rules/")
    assert result.returncode == EXIT_OK, result.stdout
    loaded = load_rules([RULES_DIR])
    lines = result.stdout.splitlines()
    passes = [line for line in lines if line.startswith("PASS  ")]
    every = loaded.rules + loaded.disabled  # disabled rules' examples run too
    assert sorted(line.split()[1] for line in passes) == sorted(r.id for r in every)
    assert len(passes) == len(every) == len(lines) - 1
    total = len(loaded.examples)
    assert lines[-1] == f"{total}/{total} examples passed"


FAILING = """\
rules:
  - id: admin-action-audit-log
    name: Admin action must write an audit log
    when: trace.has(admin.action)
    always: trace.has(audit.log)
    examples:
      - description: action and audit
        violates: false
        spans: [{name: admin.action}, {name: audit.log}]
      - description: wrongly declared quiet
        violates: false
        spans: [{name: admin.action}]
      - violates: true
        spans: [{name: audit.log}]
  - id: retry-storm
    condition: count(http.retry) > 3
    examples:
      - violates: true
        spans: [{name: http.retry}, {name: http.retry}, {name: http.retry}, {name: http.retry}]
"""


def test_test_failing_example_names_its_location(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(FAILING)
    result = betrace("test", rules)
    assert result.returncode == EXIT_FAILED
    assert result.stdout.splitlines() == [
        "FAIL  admin-action-audit-log (1/3 examples)",
        f"      - {rules}:10:9: example 'wrongly declared quiet' of admin-action-audit-log: "
        "expected no violation, but the rule fired",
        f"      - {rules}:13:9: example of admin-action-audit-log: expected a violation, but "
        "the rule stayed quiet",
        "PASS  retry-storm (1/1 examples)",
        "2/4 examples passed",
    ]


def test_test_junit_report(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(FAILING)
    junit = tmp_path / "report" / "junit.xml"
    junit.parent.mkdir()
    result = betrace("test", rules, "--junit", junit)
    assert result.returncode == EXIT_FAILED
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite"
    assert (suite.get("tests"), suite.get("failures")) == ("4", "2")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.find("failure") is not None) for c in cases] == [
        ("admin-action-audit-log", False), ("admin-action-audit-log", True),
        ("admin-action-audit-log", True), ("retry-storm", False)]
    assert cases[1].get("name") == "wrongly declared quiet"
    failure = cases[1].find("failure")
    assert failure is not None
    assert failure.get("message") == failure.text == (
        f"{rules}:10:9: example 'wrongly declared quiet' of admin-action-audit-log: expected no "
        "violation, but the rule fired")
    assert all(float(c.get("time", "-1")) >= 0 for c in cases)


def test_test_junit_all_passing(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    result = betrace("test", "rules/", "--junit", junit)
    assert result.returncode == EXIT_OK
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0"
    assert int(suite.get("tests", "0")) == len(suite.findall("testcase")) > 0


def test_test_runs_examples_of_disabled_rules_and_standalone_tests(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("""\
rules:
  - id: quiet
    enabled: false
    condition: trace.has(noisy)
    examples:
      - violates: true
        spans: [{name: noisy}]
""")
    (tmp_path / "more-tests.yaml").write_text("""\
tests:
  - rule: quiet
    description: does not fire without the span
    violates: false
    spans: [{name: calm}]
""")
    result = betrace("test", tmp_path)
    assert result.returncode == EXIT_OK
    assert result.stdout == "PASS  quiet (2/2 examples)\n2/2 examples passed\n"


def test_test_with_bad_rules_cannot_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    result = betrace("test", bad)
    assert result.returncode == EXIT_UNUSABLE
    assert result.stdout == ""
    assert f"{bad}:5:59: error[syntax]" in result.stderr
    assert result.stderr.endswith("betrace: 3 error(s) in rules; nothing was run\n")


# --- replay -------------------------------------------------------------------------------------

REPLAY_RULES = """\
rules:
  - id: payment-retry-idempotency
    name: Payment retry must reuse payment_intent_id
    severity: critical
    condition: |
      trace.has(payment.charge).where(attempt > 1)
        and trace.count(payment.charge).where(payment_intent_id == unique) > 1
    signal:
      message: Payment retry used a different payment_intent_id
      context: [order_id, payment_intent_id, attempt]
  - id: admin-action-audit-log
    name: Admin action must write an audit log
    severity: high
    when: trace.has(admin.action)
    always: trace.has(audit.log)
    signal:
      message: Admin action without an audit log
      context: [admin.operation, service.name]
"""

T1 = "5b8efff798038103d269b633813fc60c"  # the retried payment, spread over lines 1 and 3
T2 = "0af7651916cd43dd8448eb211c80319c"  # the unaudited admin action, line 2
T3 = "4bf92f3577b34da6a3ce929d0e0e4736"  # an audited admin action: no signal
BASE_NS = 1_791_036_300_000_000_000


def b64(hex_id: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_id)).decode()


def otlp_span(trace_id: str, span_id: str, name: str, start_ms: int,
              **attributes: Any) -> dict[str, Any]:
    values = []
    for key, value in attributes.items():
        if isinstance(value, bool):
            values.append({"key": key, "value": {"boolValue": value}})
        elif isinstance(value, int):
            values.append({"key": key, "value": {"intValue": str(value)}})
        else:
            values.append({"key": key, "value": {"stringValue": value}})
    start = BASE_NS + start_ms * 1_000_000
    return {"traceId": trace_id, "spanId": span_id, "name": name, "kind": 1,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 5_000_000),
            "attributes": values, "status": {}}


def otlp_line(service: str, *spans: dict[str, Any], version: str | None = None) -> str:
    resource = [{"key": "service.name", "value": {"stringValue": service}}]
    if version is not None:
        resource.append({"key": "service.version", "value": {"stringValue": version}})
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": resource},
        "scopeSpans": [{"scope": {"name": "test"}, "spans": list(spans)}]}]})


LINES = [
    otlp_line("payments",
              otlp_span(T1, "a1a1a1a1a1a1a1a1", "payment.charge", 10, order_id="ord_1",
                        payment_intent_id="pi_1abc", attempt=1),
              otlp_span(T3, "c3c3c3c3c3c3c3c3", "unrelated.span", 11), version="1.4.0"),
    otlp_line("admin-api",
              otlp_span(T2, "b2b2b2b2b2b2b2b2", "admin.action", 20, **{"admin.operation":
                                                                       "role_change"}),
              otlp_span(T3, "c1c1c1c1c1c1c1c1", "admin.action", 21, **{"admin.operation":
                                                                       "impersonate"}),
              otlp_span(T3, "c2c2c2c2c2c2c2c2", "audit.log", 22)),
    # the same trace as line 1, with base64 ids (protobuf's JSON mapping, as Tempo writes)
    otlp_line("payments",
              otlp_span(b64(T1), b64("a2a2a2a2a2a2a2a2"), "payment.charge", 900,
                        order_id="ord_1", payment_intent_id="pi_2xyz", attempt=2),
              version="1.5.0"),  # a later deploy: the signal names the latest offending span's
]
EXPECTED_PAIRS = {("payment-retry-idempotency", T1), ("admin-action-audit-log", T2)}


@pytest.fixture
def replay_files(tmp_path: Path) -> tuple[Path, Path]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(REPLAY_RULES)
    traces = tmp_path / "traces.jsonl"
    traces.write_text("\n".join(LINES) + "\n")
    return rules, traces


def signals_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def by_rule(signals: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["rule_id"]: s for s in signals}


def parse_time(text: str) -> datetime:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def test_replay_interleaved_traces_one_signal_per_rule_and_trace(
        replay_files: tuple[Path, Path]) -> None:
    rules, traces = replay_files
    before = datetime.now(timezone.utc).replace(microsecond=0)
    result = betrace("replay", "--rules", rules, traces)
    after = datetime.now(timezone.utc)
    assert result.returncode == EXIT_OK, result.stderr
    signals = signals_of(result.stdout)
    assert Counter((s["rule_id"], s["trace_id"]) for s in signals) == Counter(EXPECTED_PAIRS)
    for signal in signals:
        assert SIGNAL_FIELDS <= set(signal), signal
        assert re.fullmatch(r"[0-9a-f]{32}", signal["trace_id"])
        assert re.fullmatch(r"[0-9a-f-]{36}", signal["signal_id"])
        assert signal["mode"] == "replay"
        assert before <= parse_time(signal["detected_at"]) <= after
        assert all(re.fullmatch(r"[0-9a-f]{16}", s) for s in signal["span_ids"])
    found = by_rule(signals)
    payment = found["payment-retry-idempotency"]
    assert {k: payment[k] for k in SIGNAL_FIELDS - {"signal_id", "detected_at",
                                                    "violation_time"}} == {
        "rule_id": "payment-retry-idempotency",
        "rule_name": "Payment retry must reuse payment_intent_id",
        "severity": "critical",
        "trace_id": T1,
        "span_ids": ["a1a1a1a1a1a1a1a1", "a2a2a2a2a2a2a2a2"],  # hex line and base64 line
        "message": "Payment retry used a different payment_intent_id",
        "context": {"order_id": "ord_1", "payment_intent_id": ["pi_1abc", "pi_2xyz"],
                    "attempt": [1, 2]},
        "mode": "replay",
        "service": "payments",
        "service_version": "1.5.0",  # of a2a2..., the retry, not of the first charge (1.4.0)
    }
    admin = found["admin-action-audit-log"]
    assert {k: admin[k] for k in SIGNAL_FIELDS - {"signal_id", "detected_at",
                                                  "violation_time"}} == {
        "rule_id": "admin-action-audit-log",
        "rule_name": "Admin action must write an audit log",
        "severity": "high",
        "trace_id": T2,
        "span_ids": ["b2b2b2b2b2b2b2b2"],
        "message": "Admin action without an audit log",
        "context": {"admin.operation": "role_change", "service.name": "admin-api"},
        "mode": "replay",
        "service": "admin-api",
        "service_version": None,  # its resource has none
    }
    # The summary goes to stderr, per rule.
    assert "replayed 3 traces" in result.stderr
    assert "admin-action-audit-log: 1 violation(s) in 2 applicable trace(s), 50.00% compliant" \
        in result.stderr


def test_replay_signal_ids_are_stable_across_runs_and_line_order(
        replay_files: tuple[Path, Path], tmp_path: Path) -> None:
    rules, traces = replay_files
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(reversed(LINES)) + "\n")
    first = {(s["rule_id"], s["trace_id"]): s["signal_id"]
             for s in signals_of(betrace("replay", "--rules", rules, traces).stdout)}
    second = {(s["rule_id"], s["trace_id"]): s["signal_id"]
              for s in signals_of(betrace("replay", "--rules", rules, shuffled).stdout)}
    assert first == second and len(first) == 2


def test_replay_traces_split_across_files_are_joined(replay_files: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    rules, _ = replay_files
    sources = []
    for number, line in enumerate(LINES):
        path = tmp_path / f"part{number}.jsonl"
        path.write_text(line + "\n")
        sources.append(path)
    result = betrace("replay", "--rules", rules, *sources)
    assert result.returncode == EXIT_OK
    assert {(s["rule_id"], s["trace_id"]) for s in signals_of(result.stdout)} == EXPECTED_PAIRS
    assert len(signals_of(result.stdout)) == 2


def test_replay_csv(replay_files: tuple[Path, Path]) -> None:
    rules, traces = replay_files
    result = betrace("replay", "--rules", rules, "--format", "csv", traces)
    assert result.returncode == EXIT_OK
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert reader.fieldnames is not None
    assert SIGNAL_FIELDS - {"context"} <= set(reader.fieldnames)
    assert reader.fieldnames[:12] == [
        "signal_id", "rule_id", "rule_name", "severity", "trace_id", "span_ids", "message",
        "mode", "detected_at", "violation_time", "service", "service_version"]
    assert [f for f in reader.fieldnames if f.startswith("context.")] == [
        "context.admin.operation", "context.attempt", "context.order_id",
        "context.payment_intent_id", "context.service.name"]
    rows = {row["rule_id"]: row for row in reader}
    assert set(rows) == {"payment-retry-idempotency", "admin-action-audit-log"}
    payment = rows["payment-retry-idempotency"]
    assert payment["trace_id"] == T1
    assert payment["span_ids"] == "a1a1a1a1a1a1a1a1 a2a2a2a2a2a2a2a2"
    assert payment["context.payment_intent_id"] == "pi_1abc|pi_2xyz"
    assert payment["context.attempt"] == "1|2"
    assert payment["context.admin.operation"] == ""
    assert payment["mode"] == "replay"
    assert (payment["service"], payment["service_version"]) == ("payments", "1.5.0")
    assert rows["admin-action-audit-log"]["context.service.name"] == "admin-api"
    assert rows["admin-action-audit-log"]["service"] == "admin-api"
    assert rows["admin-action-audit-log"]["service_version"] == ""  # none in its resource


def test_replay_table(replay_files: tuple[Path, Path]) -> None:
    rules, traces = replay_files
    result = betrace("replay", "--rules", rules, "--format", "table", traces)
    assert result.returncode == EXIT_OK
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SEVERITY", "RULE", "TRACE", "WHEN", "CONTEXT"]
    assert len(lines) == 3
    rows = {line.split()[1]: line for line in lines[1:]}
    assert rows["payment-retry-idempotency"].split()[:3] == [
        "critical", "payment-retry-idempotency", T1]
    assert "payment_intent_id=pi_1abc|pi_2xyz" in rows["payment-retry-idempotency"]
    assert rows["admin-action-audit-log"].split()[:3] == ["high", "admin-action-audit-log", T2]
    # columns are aligned: the RULE column starts at the same offset on every line
    assert len({line.index(line.split()[1]) for line in lines}) == 1


def test_replay_out_file(replay_files: tuple[Path, Path], tmp_path: Path) -> None:
    rules, traces = replay_files
    out = tmp_path / "signals.jsonl"
    result = betrace("replay", "--rules", rules, "--out", out, traces)
    assert result.returncode == EXIT_OK
    assert result.stdout == ""
    signals = signals_of(out.read_text())
    assert {(s["rule_id"], s["trace_id"]) for s in signals} == EXPECTED_PAIRS
    assert "2 signal(s)" in result.stderr


def test_replay_stdin(replay_files: tuple[Path, Path]) -> None:
    rules, traces = replay_files
    result = betrace("replay", "--rules", rules, "-", stdin=traces.read_bytes())
    assert result.returncode == EXIT_OK, result.stderr
    assert {(s["rule_id"], s["trace_id"]) for s in signals_of(result.stdout)} == EXPECTED_PAIRS


def test_replay_gzip(replay_files: tuple[Path, Path], tmp_path: Path) -> None:
    rules, traces = replay_files
    packed = tmp_path / "traces.jsonl.gz"
    packed.write_bytes(gzip.compress(traces.read_bytes()))
    result = betrace("replay", "--rules", rules, packed)
    assert result.returncode == EXIT_OK, result.stderr
    assert {(s["rule_id"], s["trace_id"]) for s in signals_of(result.stdout)} == EXPECTED_PAIRS


def test_replay_gzip_on_stdin(replay_files: tuple[Path, Path]) -> None:
    rules, traces = replay_files
    result = betrace("replay", "--rules", rules, "-", stdin=gzip.compress(traces.read_bytes()))
    assert result.returncode == EXIT_OK, result.stderr
    assert len(signals_of(result.stdout)) == 2


def test_replay_malformed_lines_are_reported_and_skipped(replay_files: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    rules, _ = replay_files
    bad_span = otlp_span("not-a-trace-id", "d1d1d1d1d1d1d1d1", "admin.action", 5)
    traces = tmp_path / "mixed.jsonl"
    traces.write_text("\n".join([LINES[0], '{"resourceSpans": [', LINES[1],
                                 otlp_line("x", bad_span), LINES[2], "[1, 2]"]) + "\n")
    result = betrace("replay", "--rules", rules, traces)
    assert result.returncode == EXIT_SKIPPED_INPUT
    reported = [line for line in result.stderr.splitlines() if line.startswith("betrace: ")]
    assert [re.match(r"betrace: (.+?):(\d+): ", line).groups() for line in reported] == [
        (str(traces), "2"), (str(traces), "4"), (str(traces), "6")]
    assert reported[0].startswith(f"betrace: {traces}:2: invalid JSON")
    assert reported[1] == (f"betrace: {traces}:4: span 'admin.action': invalid traceId "
                           "'not-a-trace-id'")
    assert reported[2] == f"betrace: {traces}:6: not a JSON object"
    # everything else was still evaluated
    assert {(s["rule_id"], s["trace_id"]) for s in signals_of(result.stdout)} == EXPECTED_PAIRS
    assert "skipped 3 malformed input item(s)" in result.stderr


def test_replay_fail_on_violation(replay_files: tuple[Path, Path], tmp_path: Path) -> None:
    rules, traces = replay_files
    result = betrace("replay", "--rules", rules, "--fail-on-violation", traces)
    assert result.returncode == EXIT_FAILED
    assert len(signals_of(result.stdout)) == 2
    clean = tmp_path / "clean.jsonl"
    clean.write_text(LINES[1].replace('"b2b2b2b2b2b2b2b2"', '"c4c4c4c4c4c4c4c4"')
                     .replace(T2, T3) + "\n")
    quiet = betrace("replay", "--rules", rules, "--fail-on-violation", clean)
    assert quiet.returncode == EXIT_OK, quiet.stdout
    assert quiet.stdout == ""


def test_replay_missing_source(replay_files: tuple[Path, Path], tmp_path: Path) -> None:
    rules, traces = replay_files
    missing = tmp_path / "gone.jsonl"
    result = betrace("replay", "--rules", rules, traces, missing)
    assert result.returncode == EXIT_UNUSABLE
    assert result.stdout == ""
    assert f"betrace: {missing}: no such file" in result.stderr


def test_replay_with_bad_rules(tmp_path: Path, replay_files: tuple[Path, Path]) -> None:
    _, traces = replay_files
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    result = betrace("replay", "--rules", bad, traces)
    assert result.returncode == EXIT_UNUSABLE
    assert result.stdout == ""
    assert "nothing was run" in result.stderr


def test_replay_rule_using_a_macro_and_a_list_of_another_file(
        tmp_path: Path, replay_files: tuple[Path, Path]) -> None:
    _, traces = replay_files
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a-admin.yaml").write_text(
        "rules:\n  - id: sensitive-admin-unaudited\n"
        "    when: sensitive_admin\n    always: audit.log\n")
    (rules / "names.yaml").write_text(
        "lists:\n  sensitive_operations: [role_change, impersonate]\n"
        "macros:\n"
        "  sensitive_admin: admin.action.where(admin.operation in sensitive_operations)\n")
    result = betrace("replay", "--rules", rules, traces)
    assert result.returncode == EXIT_OK, result.stderr
    assert [(s["rule_id"], s["trace_id"], s["span_ids"]) for s in signals_of(result.stdout)] == [
        ("sensitive-admin-unaudited", T2, ["b2b2b2b2b2b2b2b2"])]


def test_replay_into_a_closed_pipe_ends_quietly(replay_files: tuple[Path, Path]) -> None:
    """`betrace replay ... | head -0`: the reader is gone before the first signal."""
    rules, traces = replay_files
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "sidecar", "replay", "--rules",
                                 str(rules), str(traces)], cwd=REPO, stdout=write_end,
                                stderr=subprocess.PIPE, timeout=120, env=_env())
    finally:
        os.close(write_end)
    assert result.returncode == EXIT_OK
    assert b"Broken pipe" not in result.stderr and b"Traceback" not in result.stderr


def test_replay_bundled_sample_matches_expected() -> None:
    started = time.monotonic()
    result = betrace("replay", "--rules", "rules/", SAMPLE)
    assert result.returncode == EXIT_OK, result.stderr
    expected = {(e["rule_id"], e["trace_id"]) for e in json.loads(EXPECTED.read_text())}
    signals = signals_of(result.stdout)
    pairs = [(s["rule_id"], s["trace_id"]) for s in signals]
    assert len(pairs) == len(set(pairs)), "one signal per (rule, trace)"
    assert set(pairs) == expected
    assert all(s["mode"] == "replay" and SIGNAL_FIELDS <= set(s) for s in signals)
    assert time.monotonic() - started < 60

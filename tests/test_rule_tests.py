"""What `betrace test` checks beyond "does the rule fire": the signal's message, context and
offending spans, resource attributes on example spans, tests over a captured OTLP JSON file,
`--rule`, and failures that show what was expected against what came (in JUnit too).

tests/data/payment-retries.otlp.jsonl holds the lines of rules/samples/incidents.otlp.jsonl (the
collector file exporter's OTLP JSON) with the spans of two checkout traces, everything else cut
out: cart cart_81723, whose retry used a new intent (payment-retry-idempotency fires), and its
clean twin cart_81790. Their spans are spread over eight requests, as in the sample.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from sidecar.model.errors import RuleError, RuleLoadError
from sidecar.replay.runner import replay_one_rule
from sidecar.rules import load_rules, load_rules_text
from sidecar.rules.examples import ExampleResult, report, run_examples

REPO = Path(__file__).resolve().parent.parent
CAPTURED = REPO / "tests" / "data" / "payment-retries.otlp.jsonl"
VIOLATING_TRACE = "14e05284d84e53390accfac9b27c457c"  # cart_81723: a retry under a new intent
CLEAN_TRACE = "f259154796c4d118df53a27cefb04306"  # cart_81790: the retry reuses its intent
MESSAGE = "Payment retry used a new payment_intent_id (the customer may be charged twice)"

RULE = f"""\
rules:
  - id: payment-retry-idempotency
    condition: |
      trace.has(payment.charge).where(attempt > 1)
        and trace.count(payment.charge).where(payment_intent_id == unique) > 1
    signal:
      message: {MESSAGE}
      context: [order_id, payment_intent_id, attempt]
    examples:
"""
SPANS = """\
        spans:
          - {name: checkout, start_ms: 0}
          - {name: payment.charge, start_ms: 20, span_id: "00000000000000b2",
             attributes: {order_id: ord_1, payment_intent_id: pi_2, attempt: 2}}
          - {name: payment.charge, start_ms: 20, span_id: "00000000000000b1",
             attributes: {order_id: ord_1, payment_intent_id: pi_1, attempt: 1}}
"""


def results_of(assertions: str) -> list[ExampleResult]:
    """Run one violating example of RULE carrying `assertions` (YAML lines at example depth)."""
    loaded = load_rules_text(RULE + "      - description: a retry with a new intent\n"
                             "        violates: true\n" + assertions + SPANS, "payments.yaml")
    return run_examples(loaded, replay_one_rule)


def failure_of(assertions: str) -> str:
    [result] = results_of(assertions)
    assert not result.passed
    return result.failure()


def only_error(text: str, path: str = "payments.yaml") -> RuleError:
    with pytest.raises(RuleLoadError) as raised:
        load_rules_text(text, path)
    [error] = raised.value.errors
    return error


HEAD = "payments.yaml:10:9: example 'a retry with a new intent' of payment-retry-idempotency: "


# --- message, context, offending ----------------------------------------------------------------

def test_each_assertion_passes_when_the_signal_says_it() -> None:
    [result] = results_of(f"        message: {MESSAGE}\n"
                          "        context: {order_id: ord_1, payment_intent_id: [pi_1, pi_2]}\n"
                          "        offending: [payment.charge, payment.charge]\n")
    assert result.passed, result.failure()


def test_message_expected_against_got() -> None:
    assert failure_of("        message: Payment retry reused an intent\n") == (
        HEAD + f'message: expected "Payment retry reused an intent", got "{MESSAGE}"')


def test_context_expected_against_got_for_the_keys_listed_only() -> None:
    # attempt is not listed, so not checked; the distinct values come in span order (start
    # time, then span id: b1 before b2)
    assert failure_of("        context: {order_id: ord_2, payment_intent_id: [pi_2, pi_1]}\n") \
        == (HEAD + 'context.order_id: expected "ord_2", got "ord_1"; '
            'context.payment_intent_id: expected ["pi_2", "pi_1"], got ["pi_1", "pi_2"]')


def test_context_values_keep_their_types() -> None:
    assert failure_of("        context: {attempt: ['1', 2]}\n") == (
        HEAD + 'context.attempt: expected ["1", 2], got [1, 2]')
    assert results_of("        context: {attempt: [1.0, 2]}\n")[0].passed  # numbers by value


def test_context_key_the_rule_does_not_copy() -> None:
    assert failure_of("        context: {amount_cents: 4999}\n") == (
        HEAD + "context.amount_cents: expected 4999, but the signal's context has no "
        "amount_cents (it has order_id, payment_intent_id, attempt)")


def test_offending_expected_against_got() -> None:
    assert failure_of("        offending: [payment.charge]\n") == (
        HEAD + "offending: expected [payment.charge], got [payment.charge, payment.charge]")


def test_a_rule_that_stays_quiet_fails_before_any_assertion() -> None:
    loaded = load_rules_text(RULE + "      - violates: true\n        message: x\n"
                             "        spans: [{name: checkout}]\n", "payments.yaml")
    [result] = run_examples(loaded)
    assert result.failure() == ("payments.yaml:10:9: example of payment-retry-idempotency: "
                                "expected a violation, but the rule stayed quiet")


@pytest.mark.parametrize("key, value, column", [
    ("message", "x", 18), ("context", "{order_id: ord_1}", 18), ("offending", "[checkout]", 20)])
def test_an_assertion_on_a_quiet_example_is_a_located_error(key: str, value: str,
                                                            column: int) -> None:
    error = only_error(RULE + f"      - violates: false\n        {key}: {value}\n"
                       "        spans: [{name: checkout}]\n")
    assert (error.location.line, error.location.column) == (11, column)
    assert error.message == (f"'{key}' asserts what the signal says, but this example expects "
                             "no signal (violates: false)")
    assert error.rule_id == "payment-retry-idempotency"


@pytest.mark.parametrize("assertion, message", [
    ("context: [order_id]", "'context' must be a mapping from the signal's context keys to "
     "their values"),
    ("offending: payment.charge", "'offending' must be a list of strings"),
])
def test_malformed_assertions_are_located(assertion: str, message: str) -> None:
    error = only_error(RULE + f"      - violates: true\n        {assertion}\n"
                       "        spans: [{name: checkout}]\n")
    assert (error.location.line, error.message) == (11, message)


def test_a_standalone_test_asserts_like_an_example(tmp_path: Path) -> None:
    (tmp_path / "payments.yaml").write_text(RULE + "      []\n")
    tests = tmp_path / "payments-tests.yaml"
    tests.write_text("tests:\n  - rule: payment-retry-idempotency\n    violates: true\n"
                     "    message: wrong\n" + SPANS.replace("        ", "    ", 1))
    [result] = run_examples(load_rules([tmp_path]), replay_one_rule)
    assert result.failure() == (f"{tests}:2:5: test of payment-retry-idempotency: message: "
                                f'expected "wrong", got "{MESSAGE}"')


def test_an_unknown_key_in_a_test_is_reported_once() -> None:
    error = only_error("tests:\n  - rule: r1\n    violates: true\n    spans: [{name: a}]\n"
                       "    mesage: x\n" "rules:\n  - id: r1\n    condition: trace.has(a)\n")
    assert error.message == "unknown key 'mesage' in test; did you mean 'message'?"


# --- resource attributes ------------------------------------------------------------------------

SERVICE_RULE = """\
rules:
  - id: refunds-from-billing
    condition: trace.has(refund).where(service.name != billing)
    signal: {context: [service.name]}
    examples:
"""


def test_resource_service_name_is_the_service() -> None:
    loaded = load_rules_text(SERVICE_RULE + """\
      - violates: true
        context: {service.name: support}
        spans: [{name: refund, resource: {service.name: support}}]
      - violates: false
        spans: [{name: refund, resource: {service.name: billing}}]
      - violates: false
        spans: [{name: refund, service: billing}]
""")
    results = run_examples(loaded)
    assert [r.passed for r in results] == [True, True, True], [r.failure() for r in results]


@pytest.mark.parametrize("span, message", [
    ("{name: refund, resource: {service.version: 1.2.0}}",
     "span 1: resource attribute 'service.version' cannot be read by rules, which see only "
     "service.name of a span's resource"),
    ("{name: refund, service: a, resource: {service.name: b}}",
     "span 1: give the service once, as 'service' or as resource 'service.name'"),
    ("{name: refund, resource: [service.name]}",
     "span 1: resource must be a mapping such as {service.name: checkout}"),
])
def test_resource_attributes_rules_cannot_read_are_refused(span: str, message: str) -> None:
    error = only_error(SERVICE_RULE + f"      - violates: false\n        spans: [{span}]\n")
    assert (error.code, error.message) == ("bad-span", message)
    assert (error.location.line, error.location.column) == (7, 17)


# --- tests over a captured file -----------------------------------------------------------------

def file_test(tmp_path: Path, expect: str) -> Path:
    """A rules directory: the catalog's payment rules, the captured file, and a test over it."""
    shutil.copy(REPO / "rules" / "payments.yaml", tmp_path / "payments.yaml")
    shutil.copy(CAPTURED, tmp_path / "captured.otlp.jsonl")
    tests = tmp_path / "captured-tests.yaml"
    tests.write_text("tests:\n  - rule: payment-retry-idempotency\n"
                     "    description: the October checkouts\n"
                     f"    file: captured.otlp.jsonl\n    expect: {expect}\n")
    return tests


def file_failure(tmp_path: Path, expect: str) -> str:
    tests = file_test(tmp_path, expect)
    loaded = load_rules([tmp_path])
    results = [r for r in run_examples(loaded, replay_one_rule) if r.example.file is not None]
    assert [r.passed for r in results] == [False]
    failure = results[0].failure()
    head = f"{tests}:2:5: test 'the October checkouts' of payment-retry-idempotency: "
    assert failure.startswith(head)
    return failure.removeprefix(head)


def test_file_test_passes_with_exactly_the_signals_found(tmp_path: Path) -> None:
    file_test(tmp_path, f"[{{trace_id: {VIOLATING_TRACE}, message: '{MESSAGE}', "
              "context: {cart.id: cart_81723, payment_intent_id: pi_3Q2xyzS}}]")
    results = run_examples(load_rules([tmp_path]), replay_one_rule)
    assert all(r.passed for r in results), [r.failure() for r in results if not r.passed]
    assert [r.fired for r in results if r.example.file is not None] == [True]


def test_file_test_lists_missing_and_unexpected_signals_by_trace(tmp_path: Path) -> None:
    assert file_failure(tmp_path, f"[{{trace_id: {CLEAN_TRACE.upper()}}}]") == (
        f"expected a signal for trace {CLEAN_TRACE}, got none; "
        f"unexpected signal for trace {VIOLATING_TRACE}")


def test_file_test_expecting_no_signal(tmp_path: Path) -> None:
    assert file_failure(tmp_path, "[]") == f"unexpected signal for trace {VIOLATING_TRACE}"


def test_file_test_compares_what_each_signal_says(tmp_path: Path) -> None:
    assert file_failure(tmp_path, f"[{{trace_id: {VIOLATING_TRACE}, message: quiet, "
                        "context: {cart.id: cart_1}}]") == (
        f'trace {VIOLATING_TRACE}: message: expected "quiet", got "{MESSAGE}"; '
        f'trace {VIOLATING_TRACE}: context.cart.id: expected "cart_1", got "cart_81723"')


def test_malformed_lines_in_the_captured_file_fail_the_test(tmp_path: Path) -> None:
    file_test(tmp_path, f"[{{trace_id: {VIOLATING_TRACE}}}]")
    with open(tmp_path / "captured.otlp.jsonl", "a") as captured:
        captured.write("{not json\n")
    [result] = [r for r in run_examples(load_rules([tmp_path]), replay_one_rule)
                if r.example.file is not None]
    assert result.error is not None
    assert result.error.startswith(f"{tmp_path / 'captured.otlp.jsonl'}:9: ")
    assert result.error.endswith(" (skipped)")


@pytest.mark.parametrize("test, message, line, column", [
    ("violates: true", "a test needs 'violates: true|false' and 'spans' (or 'file' and "
     "'expect')", 2, 5),
    ("file: missing.otlp.jsonl\n    expect: []", "no such file: {dir}/missing.otlp.jsonl", 3, 11),
    ("file: captured.otlp.jsonl", "a file test needs 'expect': a list of the signals the rule "
     "must give, such as [{{trace_id: <32 hex digits>}}] ([] for none)", 2, 5),
    ("file: captured.otlp.jsonl\n    violates: true\n    expect: []",
     "'violates' cannot be combined with 'file': a file test lists the signals it expects "
     "under 'expect'", 4, 15),
    ("file: captured.otlp.jsonl\n    expect: [{trace_id: abc}]", "an expected signal needs "
     "'trace_id': the trace id as OTLP JSON writes it (32 hex digits)", 4, 25),
    (f"file: captured.otlp.jsonl\n    expect: [{{trace_id: {CLEAN_TRACE}}}, "
     f"{{trace_id: {CLEAN_TRACE}}}]", f"trace {CLEAN_TRACE} is expected twice (a rule signals "
     "at most once per trace)", 4, 60),
])
def test_malformed_file_tests_are_located(tmp_path: Path, test: str, message: str, line: int,
                                          column: int) -> None:
    shutil.copy(CAPTURED, tmp_path / "captured.otlp.jsonl")
    tests = tmp_path / "tests.yaml"
    tests.write_text(f"tests:\n  - rule: r1\n    {test}\n")
    (tmp_path / "rules.yaml").write_text("rules:\n  - id: r1\n    condition: trace.has(a)\n")
    with pytest.raises(RuleLoadError) as raised:
        load_rules([tmp_path])
    [error] = raised.value.errors
    assert error.message == message.format(dir=tmp_path)
    assert (error.location.file, error.location.line, error.location.column) == (
        str(tests), line, column)


def test_the_report_lists_a_file_test_under_its_rule(tmp_path: Path) -> None:
    tests = file_test(tmp_path, "[]")
    loaded = load_rules([tmp_path])
    lines = report(loaded, run_examples(loaded, replay_one_rule))
    assert f"      - {tests}:2:5: test 'the October checkouts' of payment-retry-idempotency: " \
        f"unexpected signal for trace {VIOLATING_TRACE}" in lines


def test_the_schema_accepts_each_new_key() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "rules" / "schema.json").read_text())
    text = RULE + f"""\
      - violates: true
        message: {MESSAGE}
        context: {{order_id: ord_1}}
        offending: [payment.charge, payment.charge]
        spans:
          - {{name: payment.charge, resource: {{service.name: payments}},
             attributes: {{order_id: ord_1, payment_intent_id: pi_1, attempt: 1}}}}
          - {{name: payment.charge, attributes: {{order_id: ord_1, payment_intent_id: pi_2, attempt: 2}}}}
tests:
  - rule: payment-retry-idempotency
    file: {CAPTURED}
    expect: [{{trace_id: {VIOLATING_TRACE}, message: '{MESSAGE}', context: {{attempt: [1, 2]}}}}]
"""
    jsonschema.validate(yaml.safe_load(text), schema)
    assert all(r.passed for r in run_examples(load_rules_text(text), replay_one_rule))


# --- the command line ---------------------------------------------------------------------------

def betrace(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_rule_option_runs_only_that_rules_examples_and_tests(tmp_path: Path) -> None:
    file_test(tmp_path, f"[{{trace_id: {VIOLATING_TRACE}}}]")
    result = betrace("test", tmp_path, "--rule", "payment-retry-idempotency")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "PASS  payment-retry-idempotency (5/5 examples)\n" \
                            "5/5 examples passed\n"


def test_rule_option_with_an_unknown_id_names_the_nearby_ones() -> None:
    result = betrace("test", "rules/", "--rule", "payment-retry")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == ("betrace test: no rule 'payment-retry' in the files given; did you "
                             "mean payment-retry-idempotency?\n")


def test_junit_carries_the_failure_text(tmp_path: Path) -> None:
    tests = file_test(tmp_path, f"[{{trace_id: {CLEAN_TRACE}}}]")
    junit = tmp_path / "junit.xml"
    result = betrace("test", tmp_path, "--rule", "payment-retry-idempotency", "--junit", junit)
    assert result.returncode == 1
    text = (f"{tests}:2:5: test 'the October checkouts' of payment-retry-idempotency: expected "
            f"a signal for trace {CLEAN_TRACE}, got none; unexpected signal for trace "
            f"{VIOLATING_TRACE}")
    assert f"      - {text}\n" in result.stdout
    suite = ET.parse(junit).getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("5", "1")
    [failure] = suite.iter("failure")
    assert failure.get("message") == failure.text == text
    [case] = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert (case.get("classname"), case.get("name")) == ("payment-retry-idempotency",
                                                          "the October checkouts")

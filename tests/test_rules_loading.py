"""Rule files: validation with file:line:column, directories, disabled rules, standalone tests,
what a rule set reads (pruning), which rules may signal early, the signal a violation becomes,
and the shipped catalog against its JSON Schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.dsl import rule_query
from sidecar.model.errors import RuleError, RuleLoadError
from sidecar.model.signals import Signal, rfc3339, signal_id
from sidecar.model.spans import Span, Trace
from sidecar.rules import RuleSet, load_rules, load_rules_text
from sidecar.rules.compact import trace_from_compact
from sidecar.rules.examples import report, run_examples

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "rules"
SCHEMA = RULES_DIR / "schema.json"


def errors_of(text: str, path: str = "f.yaml") -> list[RuleError]:
    with pytest.raises(RuleLoadError) as raised:
        load_rules_text(text, path)
    return raised.value.errors


def only_error(text: str, path: str = "f.yaml") -> RuleError:
    errors = errors_of(text, path)
    assert len(errors) == 1, "\n".join(map(str, errors))
    return errors[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD = "rules:\n  - id: {id}\n    condition: trace.has({span})\n"


# --- validation ---------------------------------------------------------------------------------

def test_duplicate_id_across_files_reports_the_second_and_points_at_the_first(
        tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", "rules:\n  - id: dup-rule\n    condition: trace.has(a)\n")
    second = write(tmp_path / "b.yaml", "# second file\nrules:\n  - id: other\n"
                   "    condition: trace.has(b)\n  - id: dup-rule\n    condition: trace.has(c)\n")
    with pytest.raises(RuleLoadError) as raised:
        load_rules([first, second])
    assert [str(e) for e in raised.value.errors] == [
        f"{second}:5:9: error[duplicate-id]: duplicate rule id 'dup-rule' (first defined at "
        f"{first}:2:9)\n"
        " 5 |   - id: dup-rule\n"
        "   |         ^^^^^^^^"]
    assert raised.value.errors[0].rule_id == "dup-rule"


def test_duplicate_id_within_one_file() -> None:
    error = only_error("rules:\n  - id: r\n    condition: trace.has(a)\n"
                       "  - id: r\n    condition: trace.has(b)\n")
    assert error.message == "duplicate rule id 'r' (first defined at f.yaml:2:9)"
    assert (error.location.line, error.location.column) == (4, 9)


def test_unknown_rule_key_with_did_you_mean() -> None:
    error = only_error("rules:\n  - id: r1\n    condition: trace.has(a)\n    severty: high\n")
    assert str(error) == (
        "f.yaml:4:5: error[unknown-key]: unknown key 'severty' in rule 'r1'; did you mean "
        "'severity'?\n"
        " 4 |     severty: high\n"
        "   |     ^^^^^^^")


def test_misspelled_condition_reports_the_key_and_the_missing_condition() -> None:
    errors = errors_of("rules:\n  - id: r1\n    condtion: trace.has(a)\n")
    assert [(e.code, e.location.line, e.message) for e in errors] == [
        ("unknown-key", 3, "unknown key 'condtion' in rule 'r1'; did you mean 'condition'?"),
        ("schema", 2, "rule has neither 'condition' nor 'when'"),
    ]


def test_unknown_key_without_a_close_match_lists_the_allowed_keys() -> None:
    error = only_error("rules:\n  - id: r1\n    condition: trace.has(a)\n    foo: 1\n")
    assert error.message == (
        "unknown key 'foo' in rule 'r1'; expected one of: id, name, severity, description, "
        "condition, when, for_each, always, never, signal, tags, enabled, examples")


def test_unknown_key_in_signal() -> None:
    error = only_error("rules:\n  - id: r1\n    condition: trace.has(a)\n    signal:\n"
                       "      message: m\n      contxt: [a]\n")
    assert str(error) == (
        "f.yaml:6:7: error[unknown-key]: unknown key 'contxt' in signal; did you mean 'context'?\n"
        " 6 |       contxt: [a]\n"
        "   |       ^^^^^^")
    assert error.rule_id == "r1"


def test_unknown_key_in_example() -> None:
    error = only_error("rules:\n  - id: r1\n    condition: trace.has(a)\n    examples:\n"
                       "      - violates: true\n        spans: [{name: a}]\n"
                       "        descripton: x\n")
    assert str(error) == (
        "f.yaml:7:9: error[unknown-key]: unknown key 'descripton' in example; did you mean "
        "'description'?\n"
        " 7 |         descripton: x\n"
        "   |         ^^^^^^^^^^")


def test_unknown_top_level_key() -> None:
    error = only_error("rule:\n  - id: r1\n")
    assert error.message == "unknown key 'rule' in rule file; did you mean 'rules'?"
    assert (error.location.line, error.location.column) == (1, 1)


def test_bad_example_span_is_located_at_that_span() -> None:
    error = only_error("rules:\n  - id: r1\n    condition: trace.has(a)\n    examples:\n"
                       "      - violates: true\n        spans:\n          - {name: a}\n"
                       "          - {name: b, status: FAILED}\n")
    assert error.code == "bad-span"
    assert error.message == "span 2: status must be one of UNSET, OK, ERROR"
    assert (error.location.line, error.location.column) == (8, 13)


@pytest.mark.parametrize("severity, hint", [
    ("critcal", "; did you mean 'critical'?"),
    ("urgent", ""),
])
def test_bad_severity(severity: str, hint: str) -> None:
    error = only_error(f"rules:\n  - id: r1\n    severity: {severity}\n"
                       "    condition: trace.has(a)\n")
    assert str(error) == (
        f"f.yaml:3:15: error[bad-severity]: severity '{severity}' is not one of critical, high, "
        f"medium, low, info{hint}\n"
        f" 3 |     severity: {severity}\n"
        f"   |               {'^' * len(severity)}")


def test_severity_defaults_to_medium() -> None:
    assert load_rules_text(GOOD.format(id="r1", span="a")).rules[0].severity == "medium"


def test_when_without_always_or_never() -> None:
    error = only_error("rules:\n  - id: r1\n    when: trace.has(admin.action)\n")
    assert str(error) == (
        "f.yaml:3:11: error[missing-always-never]: a 'when' rule needs 'always' or 'never' "
        "(or both)\n"
        " 3 |     when: trace.has(admin.action)\n"
        "   |           ^^^^^^^^^^^^^^^^^^^^^^^")


@pytest.mark.parametrize("clause", ["always", "never"])
def test_always_or_never_without_when(clause: str) -> None:
    error = only_error(f"rules:\n  - id: r1\n    {clause}: trace.has(audit.log)\n")
    assert error.code == "schema"
    assert error.message == f"'{clause}' needs a 'when' clause"
    assert (error.location.line, error.location.column) == (3, 7 + len(clause))


def test_condition_combined_with_when() -> None:
    error = only_error("rules:\n  - id: r1\n    condition: trace.has(a)\n"
                       "    when: trace.has(b)\n    always: trace.has(c)\n")
    assert str(error) == (
        "f.yaml:4:11: error[schema]: 'when' cannot be combined with 'condition'; use one shape or "
        "the other\n"
        " 4 |     when: trace.has(b)\n"
        "   |           ^^^^^^^^^^^^")


def test_neither_condition_nor_when() -> None:
    error = only_error("rules:\n  - id: r1\n    name: nothing to check\n")
    assert error.message == "rule has neither 'condition' nor 'when'"
    assert (error.location.line, error.location.column) == (2, 5)


@pytest.mark.parametrize("rule_id", ["Bad_Id", "payment_retry", "-leading", "trailing-",
                                     "double--dash", "UPPER"])
def test_non_kebab_id(rule_id: str) -> None:
    error = only_error(f"rules:\n  - id: {rule_id}\n    condition: trace.has(a)\n")
    assert str(error) == (
        f"f.yaml:2:9: error[bad-id]: id '{rule_id}' must be kebab-case, such as "
        "'payment-retry-idempotency'\n"
        f" 2 |   - id: {rule_id}\n"
        f"   |         {'^' * len(rule_id)}")


def test_missing_id() -> None:
    error = only_error("rules:\n  - name: no id\n    condition: trace.has(a)\n")
    assert str(error) == (
        "f.yaml:2:5: error[schema]: rule has no 'id'\n"
        " 2 |   - name: no id\n"
        "   |     ^^^^^^^^^^^")


def test_rules_not_a_list() -> None:
    error = only_error("rules: {id: r1, condition: 'trace.has(a)'}\n")
    assert str(error) == (
        "f.yaml:1:8: error[schema]: 'rules' must be a list\n"
        " 1 | rules: {id: r1, condition: 'trace.has(a)'}\n"
        "   |        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^")


def test_file_not_a_mapping() -> None:
    error = only_error("- id: r1\n  condition: trace.has(a)\n")
    assert error.message == "a rule file is a mapping with a 'rules:' list"


@pytest.mark.parametrize("text", [
    "rules:\n  - id: a\n   condition: x\n",          # bad indentation
    "rules:\n  - id: a\n    condition: 'unterminated\n",
    "rules: [a, b\n",
    "rules:\n  - id: a\n\tcondition: x\n",            # a tab
    "rules:\n  - {id: a, id: b\n",
])
def test_invalid_yaml_reports_yamls_own_line_and_column(text: str) -> None:
    with pytest.raises(yaml.MarkedYAMLError) as raw:
        yaml.safe_load(text)
    mark = raw.value.problem_mark
    assert mark is not None
    error = only_error(text)
    assert error.code == "yaml"
    assert (error.location.line, error.location.column) == (mark.line + 1, mark.column + 1)
    assert error.message == f"invalid YAML: {raw.value.problem}"
    assert str(error).startswith(f"f.yaml:{mark.line + 1}:{mark.column + 1}: error[yaml]: ")


def test_invalid_yaml_message_in_full() -> None:
    assert str(only_error("rules:\n  - id: a\n   condition: x\n")) == (
        "f.yaml:3:4: error[yaml]: invalid YAML: expected <block end>, but found "
        "'<block mapping start>'\n"
        " 3 |    condition: x\n"
        "   |    ^")


def test_unprintable_character_is_a_yaml_error_not_a_crash() -> None:
    error = only_error("rules:\n  - id: r1\x1f\n    condition: trace.has(a)\n")
    assert error.code == "yaml"
    assert (error.location.line, error.location.column) == (2, 11)


@pytest.mark.parametrize("text", ["", "\n\n", "# all rules retired\n", "---\n",
                                  "--- # nothing yet\n...\n"])
def test_empty_file_has_no_rules_and_no_error(text: str, tmp_path: Path) -> None:
    assert load_rules_text(text).rules == ()
    path = write(tmp_path / "empty.yaml", text)
    loaded = load_rules([path, write(tmp_path / "x.yaml", GOOD.format(id="r1", span="a"))])
    assert [r.id for r in loaded.rules] == ["r1"]


@pytest.mark.parametrize("key, value", [("parent", '"a1"'), ("span_id", "12"),
                                        ("parent", '"00000000000000zz"')])
def test_an_example_span_id_that_is_not_16_hex_digits_is_located(key: str, value: str) -> None:
    error = only_error("rules:\n  - id: r1\n    condition: trace.has(a)\n    examples:\n"
                       "      - violates: true\n        spans:\n"
                       f"          - {{name: a, {key}: {value}}}\n")
    assert error.code == "bad-span"
    assert error.message == (f"span 1: {key} must be a span id of 16 hex digits, such as "
                             '"00000000000000a1"')
    assert error.location.line == 7


@pytest.mark.parametrize("text", [
    "rules: [{? [a] : b}]\n",                                       # a list as a key
    "rules:\n  - id: r1\n    condition: trace.has(a)\n    ? {x: 1}\n    : 2\n",
    "rules:\n  - id: r1\n    condition: trace.has(a)\n    enabled: !!int abc\n",
    "rules:\n  - id: r1\n    condition: trace.has(a)\n    examples:\n"
    "      - violates: true\n        spans: [{name: a, attributes: {? [x] : 1}}]\n",
    "rules:\n  - id: r1\n    condition: trace.has(a)\n    examples:\n"
    "      - violates: true\n        spans: &s [{name: a, attributes: {x: *s}}]\n",
    "rules:\n  - id: r1\n    condition: trace.has(a)\n    examples:\n"
    "      - violates: true\n        spans: [{name: a, start_ms: .nan}]\n",
    "rules:\n  - id: r1\n    condition: trace.has(a)\n    examples:\n"
    "      - violates: true\n        spans: [{name: a, duration_ms: .inf}]\n",
    "rules:\n  - id: r1\n    condition: trace.has(a)\n    examples:\n"
    "      - violates: true\n        spans: [{name: a, start_ms: 1000000000000000000000000}]\n",
    "rules: " + "[" * 2000 + "]" * 2000 + "\n",                  # deeper than the stack
    "rules:\n  - id: r1\n    condition: \"trace.has(\\ud800)\"\n",  # a lone surrogate
])
def test_malformed_documents_are_rule_errors_not_crashes(text: str) -> None:
    errors = errors_of(text)
    assert errors
    for error in errors:
        assert str(error).startswith("f.yaml:")
        assert error.location.line >= 1


def test_every_error_of_a_rule_is_reported_at_once() -> None:
    errors = errors_of("rules:\n  - id: Bad_Id\n    severity: urgent\n    colour: red\n"
                       "    when: trace.has(a)\n")
    assert sorted(e.code for e in errors) == [
        "bad-id", "bad-severity", "missing-always-never", "unknown-key"]


# --- files and directories ----------------------------------------------------------------------

def test_directory_with_nested_files_skips_hidden_entries(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    write(root / "payments.yaml", GOOD.format(id="payments-a", span="a"))
    write(root / "team" / "sre.yml", GOOD.format(id="sre-b", span="b"))
    write(root / "team" / "deep" / "more.yaml", GOOD.format(id="deep-c", span="c"))
    write(root / "README.md", "not a rule file: rules: [")
    write(root / ".draft.yaml", "rules: [broken")
    # A Kubernetes ConfigMap volume: the real files sit in a hidden timestamped directory,
    # `..data` points at it, and the visible names are links through `..data`.
    stamped = root / "..2026_11_23_10_00_00.000000001"
    write(stamped / "mounted.yaml", GOOD.format(id="mounted-d", span="d"))
    (root / "..data").symlink_to(stamped.name)
    (root / "mounted.yaml").symlink_to(Path("..data") / "mounted.yaml")
    loaded = load_rules([root])
    assert sorted(r.id for r in loaded.rules) == ["deep-c", "mounted-d", "payments-a", "sre-b"]
    assert sorted(Path(f).relative_to(root).as_posix() for f in loaded.files) == [
        "mounted.yaml", "payments.yaml", "team/deep/more.yaml", "team/sre.yml"]


def test_hidden_directory_alone_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "cm"
    write(root / "..data" / "rules.yaml", "rules: [broken")
    write(root / "ok.yaml", GOOD.format(id="ok", span="a"))
    assert [r.id for r in load_rules([root]).rules] == ["ok"]


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RuleLoadError) as raised:
        load_rules([missing])
    assert str(raised.value) == f"{missing}: error[io]: no such file or directory"
    assert raised.value.errors[0].as_dict() == {
        "file": str(missing), "line": 0, "column": 0, "code": "io", "rule_id": None,
        "message": "no such file or directory"}


def test_directory_without_rule_files(tmp_path: Path) -> None:
    write(tmp_path / "notes.txt", "nothing")
    with pytest.raises(RuleLoadError) as raised:
        load_rules([tmp_path])
    assert raised.value.errors[0].code == "io"
    assert "no rule files" in raised.value.errors[0].message


def test_errors_from_several_files_are_collected_at_once(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "rules:\n  - id: r1\n    condition: trace.has(a) and\n")
    b = write(tmp_path / "b.yaml", "rules:\n  - id: r2\n    severity: loud\n"
              "    condition: trace.has(b)\n")
    c = write(tmp_path / "c.yaml", "rules: [\n")
    good = write(tmp_path / "d.yaml", GOOD.format(id="fine", span="d"))
    missing = tmp_path / "e.yaml"
    with pytest.raises(RuleLoadError) as raised:
        load_rules([a, b, c, good, missing])
    found = [(e.location.file, e.location.line, e.code) for e in raised.value.errors]
    assert sorted(found) == sorted([
        (str(a), 3, "syntax"), (str(b), 3, "bad-severity"), (str(c), 2, "yaml"),
        (str(missing), 0, "io")])


# --- disabled rules and tests -------------------------------------------------------------------

DISABLED = """\
rules:
  - id: quiet-rule
    enabled: false
    condition: trace.has(noisy.span)
    examples:
      - description: fires on a noisy span
        violates: true
        spans: [{name: noisy.span}]
      - description: a wrong expectation, still checked while disabled
        violates: false
        spans: [{name: noisy.span}]
  - id: live-rule
    condition: trace.has(live.span)
"""


def test_disabled_rule_is_not_evaluated_but_its_examples_run() -> None:
    loaded = load_rules_text(DISABLED)
    assert [r.id for r in loaded.rules] == ["live-rule"]
    assert [r.id for r in loaded.disabled] == ["quiet-rule"]
    assert loaded.rule("quiet-rule") is not None
    trace = trace_from_compact([{"name": "noisy.span"}, {"name": "live.span"}])
    assert [v.rule.id for v in loaded.evaluate(trace)] == ["live-rule"]
    results = run_examples(loaded)
    assert [(r.example.rule_id, r.fired, r.passed) for r in results] == [
        ("quiet-rule", True, True), ("quiet-rule", True, False)]
    lines = report(loaded, results)
    assert lines[0] == "NONE  live-rule: no examples"
    assert lines[1] == "FAIL  quiet-rule (1/2 examples)"
    assert lines[2] == ("      - <rules>:9:9: example 'a wrong expectation, still checked "
                        "while disabled' of quiet-rule: expected no violation, but the rule fired")


def test_disabled_rule_is_still_validated() -> None:
    error = only_error("rules:\n  - id: switched-off\n    enabled: false\n"
                       "    condition: x.where(a = 1)\n")
    assert error.code == "syntax" and error.rule_id == "switched-off"


def test_disabled_rule_is_left_out_of_the_projection() -> None:
    loaded = load_rules_text(DISABLED)
    assert loaded.refs.names == frozenset({"live.span"})
    assert not loaded.projection().wants_name("noisy.span")


def test_enabled_must_be_a_boolean() -> None:
    error = only_error("rules:\n  - id: r1\n    condition: trace.has(a)\n    enabled: 'no'\n")
    assert error.message == "'enabled' must be true or false"


RULES_FILE = """\
rules:
  - id: admin-action-audit-log
    when: trace.has(admin.action)
    always: trace.has(audit.log)
"""


def test_standalone_tests_may_name_a_rule_of_another_file(tmp_path: Path) -> None:
    # "a-tests.yaml" sorts (and loads) before the file defining the rule.
    tests = write(tmp_path / "a-tests.yaml", """\
tests:
  - rule: admin-action-audit-log
    description: action without audit
    violates: true
    spans: [{name: admin.action}]
  - rule: admin-action-audit-log
    violates: false
    spans: [{name: admin.action}, {name: audit.log}]
""")
    write(tmp_path / "security.yaml", RULES_FILE)
    loaded = load_rules([tmp_path])
    assert [e.rule_id for e in loaded.examples] == ["admin-action-audit-log"] * 2
    assert [e.location.file for e in loaded.examples] == [str(tests)] * 2
    results = run_examples(loaded)
    assert all(r.passed for r in results)
    assert report(loaded, results) == ["PASS  admin-action-audit-log (2/2 examples)"]


def test_standalone_test_naming_an_unknown_rule(tmp_path: Path) -> None:
    tests = write(tmp_path / "tests.yaml", """\
tests:
  - rule: admin-action-audit-logs
    violates: true
    spans: [{name: admin.action}]
""")
    rules = write(tmp_path / "security.yaml", RULES_FILE)
    with pytest.raises(RuleLoadError) as raised:
        load_rules([rules, tests])
    assert str(raised.value) == (
        f"{tests}:2:11: error[unknown-rule]: test names unknown rule 'admin-action-audit-logs'; "
        "did you mean 'admin-action-audit-log'?\n"
        " 2 |   - rule: admin-action-audit-logs\n"
        "   |           ^^^^^^^^^^^^^^^^^^^^^^^")


def test_standalone_test_without_rule() -> None:
    error = only_error("tests:\n  - violates: true\n    spans: [{name: a}]\n")
    assert error.message == "a test needs 'rule: <rule id>'"


# --- what a rule set reads ----------------------------------------------------------------------

REFS = """\
rules:
  - id: glob-and-names
    condition: |
      "GET /users/*".where(http.status_code >= 500)
        and count(db.query).where(db.system == postgresql and tenant_id == unique) > 1
    signal:
      context: [enduser.id, tenant_id]
  - id: when-rule
    when: trace.has(admin.action).where(is_admin)
    always: audit.log before "notify.*" within 5s
    never: not trace.has(policy.check).where(result in [deny, "block"])
    signal:
      context: [admin.operation]
"""


def test_refs_collect_names_globs_and_attributes() -> None:
    loaded = load_rules_text(REFS)
    refs = loaded.refs
    assert refs.names == frozenset({"db.query", "admin.action", "audit.log", "policy.check"})
    assert refs.globs == frozenset({"GET /users/*", "notify.*"})
    assert refs.attributes == frozenset({
        "http.status_code", "db.system", "tenant_id", "enduser.id", "is_admin", "result",
        "admin.operation"})
    glob_rule = loaded.rule("glob-and-names")
    assert glob_rule is not None
    assert glob_rule.refs.attributes == frozenset(
        {"http.status_code", "db.system", "tenant_id", "enduser.id"})


def test_projection_keeps_what_rules_read() -> None:
    projection = load_rules_text(REFS).projection()
    for name in ("db.query", "admin.action", "audit.log", "policy.check", "GET /users/42",
                 "GET /users/", "notify.email"):
        assert projection.wants_name(name), name
    for name in ("GET /orders/1", "db.Query", "notify", "payment.charge", "xGET /users/1"):
        assert not projection.wants_name(name), name
    assert projection.attributes == load_rules_text(REFS).refs.attributes


def test_projection_of_names_only() -> None:
    projection = load_rules_text(GOOD.format(id="r1", span="a.b")).projection()
    assert projection.wants_name("a.b") and not projection.wants_name("a.bc")
    assert projection.attributes == frozenset()


@pytest.mark.parametrize("condition", [
    "trace.has(a) and count(b) > 3",
    "a before b",
    "a before b within 200ms",
    "count(b) >= 2",
    "3 < count(b)",
    "count(x).where(id == unique) > 1",
    "a.where(not x == 1) or b",
    'trace.has(a).where(x in [1, 2]) and "b*".where(y matches "^z")',
])
def test_monotone_conditions(condition: str) -> None:
    assert load_rules_text(yaml.safe_dump(
        {"rules": [{"id": "r", "condition": condition}]})).rules[0].logic.monotone is True


@pytest.mark.parametrize("condition", [
    "not trace.has(a)",
    "trace.has(a) and not trace.has(b)",
    "not (a before b)",
    "count(x) < 3",
    "count(x) <= 3",
    "count(x) == 3",
    "count(x) != 0",
    "3 > count(x)",
    "count(a) > count(b)",
    "count(a) >= count(b)",
    "when { trace.has(a) } always { trace.has(b) }",
    "when { trace.has(a) } never { not trace.has(b) }",
])
def test_non_monotone_conditions(condition: str) -> None:
    assert load_rules_text(yaml.safe_dump(
        {"rules": [{"id": "r", "condition": condition}]})).rules[0].logic.monotone is False


@pytest.mark.parametrize("clauses, monotone", [
    ({"when": "trace.has(a)", "always": "trace.has(b)"}, False),
    ({"when": "trace.has(a)", "never": "trace.has(b)"}, True),
    ({"when": "trace.has(a)", "never": "count(b) < 2"}, False),
    ({"when": "not trace.has(a)", "never": "trace.has(b)"}, False),
    ({"when": "trace.has(a)", "always": "trace.has(c)", "never": "trace.has(b)"}, False),
])
def test_monotone_when_rules(clauses: dict[str, str], monotone: bool) -> None:
    text = yaml.safe_dump({"rules": [{"id": "r", **clauses}]})
    assert load_rules_text(text).rules[0].logic.monotone is monotone


# --- signals ------------------------------------------------------------------------------------

PAYMENT_RULE = """\
rules:
  - id: payment-retry-idempotency
    name: Payment retry must reuse payment_intent_id
    severity: critical
    condition: |
      trace.has(payment.charge).where(attempt > 1)
        and trace.count(payment.charge).where(payment_intent_id == unique) > 1
    signal:
      message: Payment retry used a different payment_intent_id
      context: [order_id, payment_intent_id, attempt, amount_cents, http.route, coupon]
"""

RETRY = [
    {"name": "POST /checkout", "kind": "SERVER", "attributes": {"http.route": "/checkout"}},
    {"name": "payment.charge", "status": "ERROR", "start_ms": 10,
     "attributes": {"order_id": "ord_1001", "payment_intent_id": "pi_1abc", "attempt": 1,
                    "amount_cents": 4999}},
    {"name": "payment.charge", "start_ms": 900,
     "attributes": {"order_id": "ord_1001", "payment_intent_id": "pi_2xyz", "attempt": 2,
                    "amount_cents": 4999}},
]
DETECTED_NS = 1_790_000_123_456_789_000


def payment_signal(spans: list[dict[str, Any]] = RETRY, seed: str = "t1",
                   mode: str = "replay") -> Signal:
    rule = load_rules_text(PAYMENT_RULE).rules[0]
    violation = rule.evaluate(trace_from_compact(spans, seed=seed))
    assert violation is not None
    return violation.signal(mode, DETECTED_NS)


def test_signal_from_violation_in_full() -> None:
    signal = payment_signal()
    trace_id = trace_from_compact(RETRY, seed="t1").trace_id
    assert re.fullmatch(r"[0-9a-f]{32}", signal.trace_id)
    assert signal.as_dict() == {
        "signal_id": signal_id("payment-retry-idempotency", trace_id),
        "rule_id": "payment-retry-idempotency",
        "rule_name": "Payment retry must reuse payment_intent_id",
        "severity": "critical",
        "trace_id": trace_id,
        "span_ids": ["0000000000000002", "0000000000000003"],  # the two charges, by start
        "message": "Payment retry used a different payment_intent_id",
        "context": {
            "order_id": "ord_1001",                        # the same on every offending span
            "payment_intent_id": ["pi_1abc", "pi_2xyz"],   # the whitepaper's example
            "attempt": [1, 2],
            "amount_cents": 4999,
            "http.route": "/checkout",  # on no offending span: taken from the trace
            "coupon": None,             # nowhere in the trace
        },
        "mode": "replay",
        "detected_at": "2026-09-21T14:15:23.456Z",  # milliseconds, UTC
        "violation_time": "2026-09-21T14:13:20.900Z",  # the latest offending span's start
        "service": None,  # the compact spans name no service.name or service.version
        "service_version": None,
        "rule_digest": "47e4ba08bba4d2e1",  # what the rule means (test_rule_digest_*)
    }
    assert json.loads(json.dumps(signal.as_dict())) == signal.as_dict()


def test_signal_id_is_deterministic_per_rule_and_trace() -> None:
    first = payment_signal(mode="replay")
    again = payment_signal(list(reversed(RETRY)), mode="live")  # other order, other mode
    other_trace = payment_signal(seed="t2")
    assert first.signal_id == again.signal_id
    assert first.signal_id != other_trace.signal_id
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        first.signal_id)
    assert signal_id("rule-a", first.trace_id) != signal_id("rule-b", first.trace_id)
    assert signal_id("rule-a", first.trace_id) == signal_id("rule-a", first.trace_id)


def test_signal_span_ids_and_trace_id_of_real_spans() -> None:
    trace_id = "5b8efff798038103d269b633813fc60c"

    def span(span_id: str, name: str, start: int, **attributes: Any) -> Span:
        return Span(trace_id, span_id, name, start_ns=start, end_ns=start + 5,
                    attributes=attributes)

    spans = [span("00000000000000c3", "payment.charge", 300, attempt=3, payment_intent_id="pi_3"),
             span("00000000000000a1", "payment.charge", 100, attempt=1, payment_intent_id="pi_1"),
             span("00000000000000ff", "unrelated", 50),
             span("00000000000000b2", "payment.charge", 200, attempt=2, payment_intent_id="pi_1")]
    rule = load_rules_text(PAYMENT_RULE).rules[0]
    violation = rule.evaluate(Trace(trace_id, spans))
    assert violation is not None
    signal = violation.signal("live", DETECTED_NS)
    assert signal.trace_id == trace_id
    assert signal.span_ids == ["00000000000000a1", "00000000000000b2", "00000000000000c3"]
    assert signal.context["payment_intent_id"] == ["pi_1", "pi_3"]
    assert signal.context["attempt"] == [1, 2, 3]
    assert signal.context["order_id"] is None
    assert signal.mode == "live"


def test_signal_service_and_version_are_the_latest_offending_spans() -> None:
    """Whatever the rule's context lists: of the span violation_time is the start of, ties in
    start broken by span id as span_order does; another deploy's earlier span does not count."""
    trace_id = "5b8efff798038103d269b633813fc60c"

    def span(span_id: str, name: str, start: int, service: str | None, version: str | None,
             **attributes: Any) -> Span:
        return Span(trace_id, span_id, name, start_ns=start, end_ns=start + 5, service=service,
                    version=version, attributes=attributes)

    rule = load_rules_text(PAYMENT_RULE).rules[0]
    assert "service.name" not in rule.context
    spans = [span("00000000000000b2", "payment.charge", 300, "pay", "2.0", attempt=2,
                  payment_intent_id="pi_2"),
             span("00000000000000a1", "payment.charge", 100, "pay", "1.0", attempt=1,
                  payment_intent_id="pi_1"),
             span("00000000000000ff", "unrelated", 900, "other", "9.9"),
             span("0000000000000001", "payment.charge", 300, "pay-canary", "2.1", attempt=3,
                  payment_intent_id="pi_3")]
    violation = rule.evaluate(Trace(trace_id, spans))
    assert violation is not None
    signal = violation.signal("live", DETECTED_NS)
    # b2 and 01 both start at 300: b2 is later by span id, as in span_ids
    assert signal.span_ids == ["00000000000000a1", "0000000000000001", "00000000000000b2"]
    assert (signal.service, signal.service_version) == ("pay", "2.0")
    assert signal.violation_time == rfc3339(300)
    assert list(signal.as_dict())[-4:] == ["violation_time", "service", "service_version",
                                          "rule_digest"]
    # a resource without service.version: the service, and no version
    spans[0].version = None
    violation = rule.evaluate(Trace(trace_id, spans))
    assert violation is not None
    signal = violation.signal("live", DETECTED_NS)
    assert (signal.service, signal.service_version) == ("pay", None)


def test_signal_without_offending_spans_has_no_service() -> None:
    rule = load_rules_text("""\
rules:
  - id: needs-audit
    name: Every trace writes an audit log
    severity: low
    condition: not trace.has(audit.log)
    signal:
      message: no audit log
""").rules[0]
    trace_id = "5b8efff798038103d269b633813fc60c"
    trace = Trace(trace_id, [Span(trace_id, "00000000000000a1", "other", start_ns=5,
                                  service="svc", version="1.0")])
    violation = rule.evaluate(trace)
    assert violation is not None and violation.spans == []
    signal = violation.signal("replay", DETECTED_NS)
    assert (signal.span_ids, signal.violation_time) == ([], None)
    assert (signal.service, signal.service_version) == (None, None)


def test_signal_context_single_value_when_offending_spans_agree() -> None:
    rule = load_rules_text("""\
rules:
  - id: retry-storm
    condition: count(http.retry) > 1
    signal:
      context: [server.address, attempt]
""").rules[0]
    spans = [{"name": "http.retry", "attributes": {"server.address": "pricing", "attempt": n}}
             for n in (1, 2, 2)]
    violation = rule.evaluate(trace_from_compact(spans))
    assert violation is not None
    context = violation.signal("replay", DETECTED_NS).context
    assert context == {"server.address": "pricing", "attempt": [1, 2]}


def test_signal_context_keeps_types_apart() -> None:
    rule = load_rules_text("rules:\n  - id: r\n    condition: count(a) > 1\n"
                           "    signal: {context: [v]}\n").rules[0]
    spans = [{"name": "a", "attributes": {"v": value}} for value in (1, True, "1", 1.0)]
    violation = rule.evaluate(trace_from_compact(spans))
    assert violation is not None
    assert violation.signal("replay", 0).context == {"v": [1, True, "1"]}


def test_when_rule_signal_names_the_when_spans() -> None:
    rule = load_rules_text(RULES_FILE).rules[0]
    violation = rule.evaluate(trace_from_compact(
        [{"name": "GET /x"}, {"name": "admin.action", "attributes": {"op": "delete"}}]))
    assert violation is not None
    assert violation.signal("live", 0).span_ids == ["0000000000000002"]


# --- the shipped catalog and its JSON Schema ----------------------------------------------------

def shipped_rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yaml"))


def test_shipped_rules_load_and_pass_their_examples() -> None:
    loaded = load_rules([RULES_DIR])
    assert len(loaded.rules) >= 7  # one per incident pattern at least
    results = run_examples(loaded)
    assert results and all(r.passed for r in results), [r.failure() for r in results
                                                         if not r.passed]
    assert {r.example.rule_id for r in results} == {r.id for r in loaded.rules + loaded.disabled}


def _validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.exists():
        pytest.skip("rules/schema.json is not written yet")
    schema = json.loads(SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


@pytest.mark.parametrize("path", shipped_rule_files(), ids=lambda p: p.name)
def test_shipped_rule_file_matches_the_schema(path: Path) -> None:
    validator = _validator()
    errors = sorted(validator.iter_errors(yaml.safe_load(path.read_text())), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


VALID_RULE: dict[str, Any] = {"id": "r1", "severity": "high", "condition": "trace.has(a)"}


@pytest.mark.parametrize("document", [
    {"rules": [{**VALID_RULE, "colour": "red"}]},                              # unknown key
    {"rules": [{**VALID_RULE, "severity": "urgent"}]},                         # bad severity
    {"rules": [{"condition": "trace.has(a)"}]},                                # missing id
    {"rules": [{**VALID_RULE, "id": "Bad_Id"}]},                               # not kebab-case
    {"rules": [{"id": "r1", "when": "trace.has(a)"}]},                         # no always/never
    {"rules": [{**VALID_RULE, "when": "trace.has(b)", "always": "trace.has(c)"}]},
    {"rules": [{"id": "r1", "for_each": "a", "when": "b", "always": "c"}]},
    {"rules": [{"id": "r1", "for_each": "a"}]},
    {"rules": [{**VALID_RULE, "signal": {"mesage": "m"}}]},                    # unknown in signal
    {"rules": [{**VALID_RULE, "examples": [{"violates": True}]}]},             # no spans
    {"rules": {"id": "r1"}},                                                   # not a list
    {"rule": []},                                                              # unknown top key
    {"rules": [{**VALID_RULE, "examples": [{"violates": False, "message": "m",
                                            "spans": [{"name": "a"}]}]}]},
    {"rules": [VALID_RULE], "tests": [{"rule": "r1", "file": "f.otlp.jsonl", "expect": [],
                                       "violates": True}]},
    {"rules": [{**VALID_RULE, "examples": [{"violates": True, "spans": [
        {"name": "a", "resource": {"service.version": "1.0"}}]}]}]},
], ids=["unknown-key", "bad-severity", "missing-id", "bad-id", "no-always-never",
        "condition-and-when", "for-each-and-when", "for-each-alone", "signal-key", "example-without-spans", "rules-not-list",
        "top-level-key", "assertion-on-quiet-example", "file-test-with-violates",
        "unreadable-resource-attribute"])
def test_schema_rejects_invalid_documents(document: dict[str, Any]) -> None:
    validator = _validator()
    assert not validator.is_valid(document)
    # The loader refuses each of them too: the schema is never looser than `betrace check`.
    with pytest.raises(RuleLoadError):
        load_rules_text(yaml.safe_dump(document))


def test_schema_accepts_what_the_loader_accepts() -> None:
    validator = _validator()
    document = yaml.safe_load(DISABLED + REFS.removeprefix("rules:\n"))
    load_rules_text(yaml.safe_dump(document))
    assert validator.is_valid(document)


def test_ruleset_is_frozen_and_digest_depends_on_content() -> None:
    first = load_rules_text(GOOD.format(id="r1", span="a"))
    second = load_rules_text(GOOD.format(id="r1", span="b"))
    assert isinstance(first, RuleSet)
    assert first.digest != second.digest
    assert first.digest == load_rules_text(GOOD.format(id="r1", span="a")).digest


def test_projection_keeps_per_span_name_what_the_rules_selecting_it_read_and_signal_context(
        ) -> None:
    """A signal's context falls back to any span of the trace, so context attributes are kept
    on every selected span; the rest only on the spans of the selectors that read them."""
    ruleset = load_rules_text(
        "rules:\n"
        "  - id: a\n"
        "    condition: payment.charge.where(attempt > 1) and count(x).where(k == unique) > 1\n"
        "    signal: {context: [order_id]}\n"
        "  - id: b\n"
        '    condition: \'"GET *".where(http.status_code >= 500)\'\n')
    projection = ruleset.projection()
    assert projection.attributes_for("payment.charge") == {"attempt", "order_id"}
    assert projection.attributes_for("x") == {"k", "order_id"}
    assert projection.attributes_for("GET /users") == {"http.status_code", "order_id"}
    assert projection.attributes == {"attempt", "k", "order_id", "http.status_code"}


# --- lists and macros (DESIGN rule 20) ----------------------------------------------------------

NAMES_FILE = """\
lists:
  sensitive_operations: [role_change, impersonate]
macros:
  sensitive_admin: admin.action.where(admin.operation in sensitive_operations)
  unaudited: not audit.log
"""


def test_lists_and_macros_are_shared_by_the_files_loaded_together(tmp_path: Path) -> None:
    # "a-rules.yaml" loads before the file declaring the names it uses.
    write(tmp_path / "a-rules.yaml", "rules:\n  - id: sensitive-unaudited\n"
          "    condition: sensitive_admin and unaudited\n")
    write(tmp_path / "names.yaml", NAMES_FILE)
    rule = load_rules([tmp_path]).rules[0]
    fires = trace_from_compact([{"name": "admin.action",
                                 "attributes": {"admin.operation": "impersonate"}}])
    audited = trace_from_compact([{"name": "admin.action",
                                   "attributes": {"admin.operation": "impersonate"}},
                                  {"name": "audit.log"}])
    other = trace_from_compact([{"name": "admin.action",
                                 "attributes": {"admin.operation": "read"}}])
    assert [rule.evaluate(t) is not None for t in (fires, audited, other)] == [True, False, False]


def test_duplicate_name_across_files_names_both_places(tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", NAMES_FILE)
    second = write(tmp_path / "b.yaml", "macros:\n  unaudited: not audit.trail\n")
    with pytest.raises(RuleLoadError) as raised:
        load_rules([first, second])
    assert [str(e) for e in raised.value.errors] == [
        f"{second}:2:3: error[duplicate-name]: duplicate macro name 'unaudited' (first declared "
        f"as a macro at {first}:5:3)\n"
        " 2 |   unaudited: not audit.trail\n"
        "   |   ^^^^^^^^^"]


def test_undefined_list_is_located_at_its_name() -> None:
    error = only_error("lists:\n  codes: [500]\nrules:\n  - id: r1\n"
                       "    condition: http.request.where(code in server_codes)\n")
    assert str(error) == (
        "f.yaml:5:43: error[undefined-list]: undefined list 'server_codes'; lists defined: codes\n"
        " 5 |     condition: http.request.where(code in server_codes)\n"
        "   |                                           ^^^^^^^^^^^^")
    assert error.rule_id == "r1"


def test_error_inside_a_macro_is_located_at_its_use_and_names_the_macro() -> None:
    error = only_error("macros:\n  distinct_ids: id == unique\nrules:\n  - id: r1\n"
                       "    condition: |\n      x.where(a > 1)\n        and y.where(distinct_ids)\n")
    assert str(error) == (
        "f.yaml:7:21: error[misplaced-unique]: in macro 'distinct_ids' (f.yaml:2): 'unique' is "
        "reserved for count(...).where(attr == unique)\n"
        " 7 |         and y.where(distinct_ids)\n"
        "   |                     ^^^^^^^^^^^^")


def test_syntax_error_in_a_macro_is_located_in_its_body_even_unused() -> None:
    error = only_error("macros:\n  big: amount >> 1000\nrules:\n  - id: r1\n    condition: x\n")
    assert (error.location.line, error.location.column, error.code) == (2, 16, "syntax")


def test_predicate_macro_used_as_a_condition_says_where_it_can_stand() -> None:
    error = only_error("macros:\n  big: amount > 1000\nrules:\n  - id: r1\n    condition: big\n")
    assert str(error) == (
        "f.yaml:5:16: error[macro-use]: macro 'big' (f.yaml:2) is a span predicate: it can stand "
        "only inside .where(...)\n"
        " 5 |     condition: big\n"
        "   |                ^^^")


def test_a_broken_macro_is_reported_once_not_at_every_use() -> None:
    errors = errors_of("macros:\n  ping: pong\n  pong: ping\nrules:\n  - id: r1\n"
                       "    condition: ping and pong\n")
    assert [(e.location.line, e.message) for e in errors] == [
        (2, "recursive macros: ping -> pong -> ping")]


def test_rule_set_tells_which_lists_and_macros_no_rule_uses() -> None:
    loaded = load_rules_text(NAMES_FILE + "  unused_macro: x\n"
                             "rules:\n  - id: r1\n    enabled: false\n"
                             "    condition: sensitive_admin\n")
    assert [(declared.name, declared.kind) for declared in loaded.declarations] == [
        ("sensitive_operations", "list"), ("sensitive_admin", "macro"), ("unaudited", "macro"),
        ("unused_macro", "macro")]
    assert [(unused.name, unused.location.line) for unused in loaded.unused_declarations] == [
        ("unaudited", 5), ("unused_macro", 6)]


def test_passes_see_the_expanded_rule() -> None:
    """Pruning, early signals and the TraceQL pushdown read the expanded tree."""
    loaded = load_rules_text(NAMES_FILE + "rules:\n  - id: r1\n"
                             "    condition: sensitive_admin and unaudited\n")
    rule = loaded.rules[0]
    assert loaded.refs.names == {"admin.action", "audit.log"}
    assert loaded.projection().attributes_for("admin.action") == {"admin.operation"}
    assert not rule.logic.monotone
    assert rule_query(rule) == ('{ name = "admin.action" && (span.admin.operation = '
                                '"role_change" || span.admin.operation = "impersonate") }')


def test_schema_accepts_lists_and_macros() -> None:
    document = NAMES_FILE + "rules:\n  - id: r1\n    condition: sensitive_admin\n"
    load_rules_text(document)
    assert _validator().is_valid(yaml.safe_load(document))
    assert not _validator().is_valid({"macros": {"and": "x"}})


def test_digest_changes_when_a_macro_changes(tmp_path: Path) -> None:
    write(tmp_path / "rules.yaml", "rules:\n  - id: r1\n    condition: x.where(big)\n")
    names = write(tmp_path / "names.yaml", "macros:\n  big: amount > 1000\n")
    before = load_rules([tmp_path]).digest
    names.write_text("macros:\n  big: amount > 5000\n")
    assert load_rules([tmp_path]).digest != before


def test_macros_doubling_past_the_size_limit_are_refused_where_declared() -> None:
    doubling = "".join(f"  m{i}: m{i - 1} or m{i - 1}\n" for i in range(1, 14))
    error = only_error(f"macros:\n  m0: a\n{doubling}rules:\n  - id: r1\n    condition: m13\n")
    assert (error.code, error.location.line) == ("too-large", 15)
    assert "once its macros are expanded" in error.message


def test_rule_digest_follows_meaning_not_layout() -> None:
    """The digest stored with each signal changes with what a rule means (its condition,
    severity, context...), not with how its text is laid out."""
    from sidecar.rules import load_rules_text

    def digest(condition: str, severity: str = "high", context: str = "[a]") -> str:
        (rule,) = load_rules_text(f"""
rules:
  - id: r
    name: r
    severity: {severity}
    condition: {condition}
    signal:
      context: {context}
""").rules
        return rule.digest

    base = digest("x.where(a > 1) and not y")
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert digest("x.where(a >   1)   and not   y") == base
    assert digest("x.where(a > 2) and not y") != base
    assert digest("x.where(a > 1) and not y", severity="critical") != base
    assert digest("x.where(a > 1) and not y", context="[a, b]") != base

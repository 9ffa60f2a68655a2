"""What a person sees when a rule expression is wrong: the exact message, the place, the caret.

Each expected text is written out in full, caret line included. Through the rule loader the place
is a line and column in the YAML file, whatever the scalar style holding the expression (plain,
`|`, `>`, double-quoted, single-quoted), and the caret sits under the offending text in that file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.dsl import MAX_EXPRESSION_BYTES, compile_expression
from sidecar.model.errors import ExpressionError, RuleError, RuleLoadError
from sidecar.model.spans import Trace
from sidecar.rules import load_rules, load_rules_text
from sidecar.rules.compact import trace_from_compact

CONSTRUCTS = ("a name, a \"quoted string\", a number, count(...), trace.has(...), not, '('")


def expression_error(text: str) -> ExpressionError:
    with pytest.raises(ExpressionError) as raised:
        compile_expression(text)
    return raised.value


def load_error(text: str, path: str = "rules.yaml") -> RuleError:
    """The only error loading `text` gives."""
    with pytest.raises(RuleLoadError) as raised:
        load_rules_text(text, path)
    errors = raised.value.errors
    assert len(errors) == 1, str(raised.value)
    return errors[0]


def caret_column(rendered: str) -> int:
    """1-based column of the first caret in a rendered snippet, relative to the source text."""
    caret_line = rendered.splitlines()[-1]
    gutter = caret_line.index("|") + 2
    return caret_line.index("^") - gutter + 1


# --- <expression>:line:col ----------------------------------------------------------------------

def test_unexpected_token() -> None:
    error = expression_error("trace.has(a) trace.has(b)")
    assert str(error) == (
        "<expression>:1:14: error[syntax]: unexpected 'trace.has'; expected .where(...), before, "
        "within, and, or, ')', '}'\n"
        " 1 | trace.has(a) trace.has(b)\n"
        "   |              ^^^^^^^^^")
    assert (error.start, error.end, error.code) == (13, 22, "syntax")


def test_unexpected_closing_parenthesis() -> None:
    assert str(expression_error("trace.has(a))")) == (
        "<expression>:1:13: error[syntax]: unexpected ')'; expected the end of the expression\n"
        " 1 | trace.has(a))\n"
        "   |             ^")


def test_unexpected_end_inside_where() -> None:
    assert str(expression_error("x.where(a == 1")) == (
        "<expression>:1:15: error[syntax]: unexpected end of expression; expected and, or, ')', "
        "']', ','\n"
        " 1 | x.where(a == 1\n"
        "   |               ^")


def test_unexpected_end_after_and() -> None:
    assert str(expression_error("trace.has(a) and")) == (
        f"<expression>:1:17: error[syntax]: unexpected end of expression; expected {CONSTRUCTS}\n"
        " 1 | trace.has(a) and\n"
        "   |                 ^")


def test_unexpected_end_of_expression_ending_in_newline_points_at_the_last_word() -> None:
    # A YAML `|` block always ends in a newline; the caret must stay on the text, not past it.
    assert str(expression_error("trace.has(a)\n  and\n")) == (
        f"<expression>:2:6: error[syntax]: unexpected end of expression; expected {CONSTRUCTS}\n"
        " 2 |   and\n"
        "   |      ^")


def test_unexpected_end_of_count_comparison() -> None:
    assert str(expression_error("count(x) >")) == (
        "<expression>:1:11: error[syntax]: unexpected end of expression; expected a number, "
        "count(...)\n"
        " 1 | count(x) >\n"
        "   |           ^")


def test_in_dsl_when_without_always_or_never() -> None:
    assert str(expression_error("when { trace.has(a) }")) == (
        "<expression>:1:22: error[syntax]: unexpected end of expression; expected always, never\n"
        " 1 | when { trace.has(a) }\n"
        "   |                      ^")


def test_single_equals_sign() -> None:
    assert str(expression_error("x.where(a = 1)")) == (
        "<expression>:1:11: error[syntax]: unexpected character '='; expected a comparison "
        "(== != < <= > >=), in, matches, contains, and, or, ')' ('=' is not an operator; did you "
        "mean '=='?)\n"
        " 1 | x.where(a = 1)\n"
        "   |           ^")


def test_double_ampersand() -> None:
    assert str(expression_error("x.where(a && b)")) == (
        "<expression>:1:11: error[syntax]: unexpected character '&'; expected a comparison "
        "(== != < <= > >=), in, matches, contains, and, or, ')' (use 'and' instead of '&&')\n"
        " 1 | x.where(a && b)\n"
        "   |           ^")


def test_single_quoted_string() -> None:
    assert str(expression_error("x.where(a == 'b')")) == (
        "<expression>:1:14: error[syntax]: unexpected character \"'\"; expected a name, a "
        "\"quoted string\", a number (strings are written in double quotes)\n"
        " 1 | x.where(a == 'b')\n"
        "   |              ^")


def test_error_on_second_line_names_that_line() -> None:
    assert str(expression_error("trace.has(a)\n  and x.where(b = 2)")) == (
        "<expression>:2:17: error[syntax]: unexpected character '='; expected a comparison "
        "(== != < <= > >=), in, matches, contains, and, or, ')' ('=' is not an operator; did you "
        "mean '=='?)\n"
        " 2 |   and x.where(b = 2)\n"
        "   |                 ^")


def test_invalid_regex() -> None:
    error = expression_error('x.where(a matches "(")')
    assert str(error) == (
        "<expression>:1:19: error[bad-regex]: invalid regular expression '(' (RE2 syntax): "
        "missing ): (\n"
        ' 1 | x.where(a matches "(")\n'
        "   |                   ^^^")
    assert error.code == "bad-regex"


def test_regex_backreference_is_rejected_by_re2() -> None:
    # `\1` is not an escape of the DSL's strings, so the pattern is (a)\1: a backreference,
    # which RE2 (linear time) does not support. It must fail at load, not never match.
    assert str(expression_error(r'x.where(a matches "(a)\1")')) == (
        r"<expression>:1:19: error[bad-regex]: invalid regular expression '(a)\\1' (RE2 syntax): "
        "invalid escape sequence: \\1\n"
        ' 1 | x.where(a matches "(a)\\1")\n'
        "   |                   ^^^^^^^")


def test_regex_lookahead_is_rejected_by_re2() -> None:
    error = expression_error('x.where(a matches "foo(?=bar)")')
    assert error.code == "bad-regex"
    assert str(error).splitlines()[0].startswith(
        "<expression>:1:19: error[bad-regex]: invalid regular expression 'foo(?=bar)' (RE2 "
        "syntax): ")


def test_unique_outside_count_where() -> None:
    assert str(expression_error("x.where(a == unique)")) == (
        "<expression>:1:9: error[misplaced-unique]: 'unique' is reserved for "
        "count(...).where(attr == unique)\n"
        " 1 | x.where(a == unique)\n"
        "   |         ^^^^^^^^^^^")


def test_unique_in_an_or_inside_count_where() -> None:
    assert str(expression_error("count(x).where(a == unique or b == 1) > 1")) == (
        "<expression>:1:16: error[misplaced-unique]: 'attr == unique' must be a term of its own, "
        "joined to the rest with 'and'\n"
        " 1 | count(x).where(a == unique or b == 1) > 1\n"
        "   |                ^^^^^^^^^^^")


def test_two_uniques_in_one_count() -> None:
    assert str(expression_error("count(x).where(a == unique and b == unique) > 1")) == (
        "<expression>:1:32: error[misplaced-unique]: count distinct values of one attribute at a "
        "time\n"
        " 1 | count(x).where(a == unique and b == unique) > 1\n"
        "   |                                ^^^^^^^^^^^")


def test_count_compared_with_a_decimal() -> None:
    assert str(expression_error("count(x) > 1.5")) == (
        "<expression>:1:12: error[syntax]: a count compares with an integer or another count, "
        "not '1.5'\n"
        " 1 | count(x) > 1.5\n"
        "   |            ^^^")


def test_decimal_on_the_left_of_a_count() -> None:
    assert str(expression_error("2.5 <= count(x)")) == (
        "<expression>:1:1: error[syntax]: a count compares with an integer or another count, "
        "not '2.5'\n"
        " 1 | 2.5 <= count(x)\n"
        "   | ^^^")


def test_always_given_twice_in_dsl() -> None:
    text = "when { trace.has(a) } always { trace.has(b) } always { trace.has(c) }"
    assert str(expression_error(text)) == (
        "<expression>:1:47: error[syntax]: 'always' given twice\n"
        f" 1 | {text}\n"
        "   |                                               ^^^^^^")


def test_never_given_twice_in_dsl() -> None:
    text = "when {trace.has(a)}\nnever {trace.has(b)}\nnever {trace.has(c)}"
    assert str(expression_error(text)) == (
        "<expression>:3:1: error[syntax]: 'never' given twice\n"
        " 3 | never {trace.has(c)}\n"
        "   | ^^^^^")


def test_expression_over_64_kib() -> None:
    text = "trace.has(a) or " * 4096 + "trace.has(b)"  # 65548 bytes
    assert len(text.encode()) > MAX_EXPRESSION_BYTES == 64 * 1024
    assert str(expression_error(text)) == (
        f"<expression>:1:1: error[too-large]: expression is {len(text)} bytes; the limit is "
        "65536\n"
        f" 1 | {text[:120]}...\n"
        "   | ^")


def test_size_limit_counts_bytes_not_characters() -> None:
    body = "é" * 32_761  # 32_761 characters, 65_522 bytes
    text = f'x.where(a == "{body}")'
    assert len(text) < MAX_EXPRESSION_BYTES < len(text.encode())
    error = expression_error(text)
    assert error.code == "too-large"
    assert str(error).splitlines()[0] == (
        f"<expression>:1:1: error[too-large]: expression is {len(text.encode())} bytes; the "
        "limit is 65536")


def test_expression_of_exactly_64_kib_is_accepted() -> None:
    head, tail = 'x.where(a == "', '")'
    text = head + "v" * (MAX_EXPRESSION_BYTES - len(head) - len(tail)) + tail
    assert len(text.encode()) == MAX_EXPRESSION_BYTES
    compiled = compile_expression(text)
    trace = trace_from_compact([{"name": "x", "attributes": {"a": "v" * (len(text) - 16)}}])
    assert compiled.test(trace)


def test_200_nested_nots_are_refused_with_a_caret() -> None:
    text = "not " * 200 + "trace.has(a)"
    error = expression_error(text)
    # start, any_of and all_of are three levels; the 98th `not` is level 101.
    assert str(error) == (
        "<expression>:1:389: error[too-deep]: expression nests too deeply (over 100 parse "
        "levels, about 45 nested parentheses); split it into simpler terms\n"
        f" 1 | ...{text[328:448]}...\n"  # a long line is shown as a window around the caret
        f"   | {' ' * 63}^")
    assert text[388:391] == "not"


def test_200_nested_parentheses_in_a_where_are_refused_with_a_caret() -> None:
    text = "x.where(" + "(" * 200 + "a == 1" + ")" * 200 + ")"
    error = expression_error(text)
    assert str(error) == (
        "<expression>:1:56: error[too-deep]: expression nests too deeply (over 100 parse "
        "levels, about 45 nested parentheses); split it into simpler terms\n"
        f" 1 | {text[:120]}...\n"
        f"   | {' ' * 55}^")


def _deepest_accepted(build: Callable[[int], str]) -> int:
    depth = 1
    while True:
        try:
            compile_expression(build(depth + 1))
        except ExpressionError as exc:
            assert exc.code == "too-deep", str(exc)
            return depth
        depth += 1
        assert depth < 1000, "no depth limit at all"


TRACE_WITH_A = trace_from_compact([{"name": "a"}, {"name": "x", "attributes": {"a": 1}}])


@pytest.mark.parametrize("shape", ["not", "parens", "where-parens", "where-not", "mixed"])
def test_deepest_accepted_nesting_evaluates_without_recursion_error(shape: str) -> None:
    builders = {
        "not": lambda n: "not " * n + "trace.has(a)",
        "parens": lambda n: "(" * n + "trace.has(a)" + ")" * n,
        "where-parens": lambda n: "x.where(" + "(" * n + "a == 1" + ")" * n + ")",
        "where-not": lambda n: "x.where(" + "not " * n + "a == 1)",
        "mixed": lambda n: "(not " * n + "trace.has(a)" + ")" * n,
    }
    build = builders[shape]
    depth = _deepest_accepted(build)
    assert depth >= 20, "a person may nest a rule twenty levels deep"
    compiled = compile_expression(build(depth))
    odd_nots = shape in ("not", "where-not", "mixed") and depth % 2 == 1
    assert compiled.test(TRACE_WITH_A) is (not odd_nots)
    assert compiled.test(Trace(TRACE_WITH_A.trace_id, [])) is (odd_nots and shape != "where-not")
    assert compiled.witness(TRACE_WITH_A) is not None
    # Through the rule loader as well: loading, monotonicity and references walk the tree too.
    rule = load_rules_text(f"rules:\n  - id: deep\n    condition: '{build(depth)}'\n").rules[0]
    assert (rule.evaluate(TRACE_WITH_A) is not None) is (not odd_nots)


# --- file:line:col through the rule loader ------------------------------------------------------

def test_plain_scalar() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: trace.has(a) trace.has(b)\n")
    assert str(load_error(text)) == (
        "rules.yaml:3:29: error[syntax]: unexpected 'trace.has'; expected .where(...), before, "
        "within, and, or, ')', '}'\n"
        " 3 |     condition: trace.has(a) trace.has(b)\n"
        "   |                             ^^^^^^^^^")


def test_plain_scalar_continued_on_the_next_line() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: trace.has(a)\n"
            "      and count(b) > 1.5\n")
    error = load_error(text)
    assert str(error) == (
        "rules.yaml:4:22: error[syntax]: a count compares with an integer or another count, "
        "not '1.5'\n"
        " 4 |       and count(b) > 1.5\n"
        "   |                      ^^^")
    assert error.rule_id == "r1"


def test_block_scalar_error_on_its_second_line() -> None:
    text = ("# payments\n"
            "rules:\n"
            "  - id: payment-retry-idempotency\n"
            "    severity: critical\n"
            "    condition: |\n"
            "      trace.has(payment.charge).where(attempt > 1)\n"
            "        and trace.count(payment.charge).where(payment_intent_id = unique) > 1\n")
    error = load_error(text, "payments.yaml")
    assert str(error) == (
        "payments.yaml:7:65: error[syntax]: unexpected character '='; expected a comparison "
        "(== != < <= > >=), in, matches, contains, and, or, ')' ('=' is not an operator; did you "
        "mean '=='?)\n"
        " 7 |         and trace.count(payment.charge).where(payment_intent_id = unique) > 1\n"
        "   |                                                                 ^")
    loc = error.location
    assert (loc.file, loc.line, loc.column) == ("payments.yaml", 7, 65)
    assert loc.source_line[loc.column - 1] == "="


def test_block_scalar_unexpected_end_points_at_its_last_word() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: |\n"
            "      trace.has(a) and\n"
            "\n"
            "  - id: r2\n"
            "    condition: trace.has(b)\n")
    assert str(load_error(text)) == (
        f"rules.yaml:4:23: error[syntax]: unexpected end of expression; expected {CONSTRUCTS}\n"
        " 4 |       trace.has(a) and\n"
        "   |                       ^")


def test_block_scalar_keep_chomping_unexpected_end() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: |+\n"
            "      count(a) >\n"
            "\n"
            "\n")
    assert str(load_error(text)) == (
        "rules.yaml:4:17: error[syntax]: unexpected end of expression; expected a number, "
        "count(...)\n"
        " 4 |       count(a) >\n"
        "   |                 ^")


def test_folded_scalar() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: >\n"
            "      trace.has(payment.charge)\n"
            "      and x.where(a matches \"(\")\n")
    assert str(load_error(text)) == (
        "rules.yaml:5:29: error[bad-regex]: invalid regular expression '(' (RE2 syntax): "
        "missing ): (\n"
        ' 5 |       and x.where(a matches "(")\n'
        "   |                             ^^^")


def test_double_quoted_scalar_with_escaped_quotes_before_the_error() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            '    condition: "x.where(name == \\"a\\" and b = 1)"\n')
    error = load_error(text)
    assert str(error) == (
        "rules.yaml:3:45: error[syntax]: unexpected character '='; expected a comparison "
        "(== != < <= > >=), in, matches, contains, and, or, ')' ('=' is not an operator; did you "
        "mean '=='?)\n"
        ' 3 |     condition: "x.where(name == \\"a\\" and b = 1)"\n'
        "   |                                             ^")
    assert error.location.source_line[44] == "="


def test_double_quoted_scalar_unique_outside_count() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            '    condition: "trace.has(\\"GET /x\\").where(a == unique)"\n')
    assert str(load_error(text)) == (
        "rules.yaml:3:45: error[misplaced-unique]: 'unique' is reserved for "
        "count(...).where(attr == unique)\n"
        ' 3 |     condition: "trace.has(\\"GET /x\\").where(a == unique)"\n'
        "   |                                             ^^^^^^^^^^^")


def test_double_quoted_scalar_backreference() -> None:
    # In YAML's double quotes `\\` is one backslash: the DSL text is x.where(a matches "(a)\1").
    text = ("rules:\n"
            "  - id: r1\n"
            '    condition: "x.where(a matches \\"(a)\\\\1\\")"\n')
    error = load_error(text)
    assert str(error) == (
        "rules.yaml:3:36: error[bad-regex]: invalid regular expression '(a)\\\\1' (RE2 syntax): "
        "invalid escape sequence: \\1\n"
        ' 3 |     condition: "x.where(a matches \\"(a)\\\\1\\")"\n'
        "   |                                    ^^^^^^^^^")


def test_single_quoted_scalar_with_doubled_quotes_before_the_error() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: 'x.where(name == \"it''s\" and b = 1)'\n")
    assert str(load_error(text)) == (
        "rules.yaml:3:47: error[syntax]: unexpected character '='; expected a comparison "
        "(== != < <= > >=), in, matches, contains, and, or, ')' ('=' is not an operator; did you "
        "mean '=='?)\n"
        " 3 |     condition: 'x.where(name == \"it''s\" and b = 1)'\n"
        "   |                                               ^")


def test_plain_scalar_followed_by_a_comment() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: trace.has(a) and   # incomplete\n")
    assert str(load_error(text)) == (
        f"rules.yaml:3:32: error[syntax]: unexpected end of expression; expected {CONSTRUCTS}\n"
        " 3 |     condition: trace.has(a) and   # incomplete\n"
        "   |                                ^")


def test_error_in_always_clause_names_the_always_line() -> None:
    text = ("rules:\n"
            "  - id: admin-audit\n"
            "    when: trace.has(admin.action)\n"
            "    always: audit.log.where(a == unique)\n")
    error = load_error(text)
    assert str(error) == (
        "rules.yaml:4:29: error[misplaced-unique]: 'unique' is reserved for "
        "count(...).where(attr == unique)\n"
        " 4 |     always: audit.log.where(a == unique)\n"
        "   |                             ^^^^^^^^^^^")
    assert error.rule_id == "admin-audit"


def test_in_dsl_clause_given_twice_in_a_block_scalar() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: |\n"
            "      when { trace.has(a) }\n"
            "      always { trace.has(b) }\n"
            "      always { trace.has(c) }\n")
    assert str(load_error(text)) == (
        "rules.yaml:6:7: error[syntax]: 'always' given twice\n"
        " 6 |       always { trace.has(c) }\n"
        "   |       ^^^^^^")


def test_in_dsl_form_inside_a_when_clause_is_refused() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    when: when { trace.has(a) } never { trace.has(b) }\n"
            "    never: trace.has(c)\n")
    error = load_error(text)
    assert error.location.line == 3 and error.location.column == 11
    assert "cannot be nested inside a clause" in error.message


def test_too_deep_in_a_block_scalar() -> None:
    nots = "not " * 200
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: |\n"
            f"      {nots}trace.has(a)\n")
    error = load_error(text)
    assert error.code == "too-deep"
    assert (error.location.line, error.location.column) == (4, 7 + 388)
    assert str(error).splitlines()[0] == (
        "rules.yaml:4:395: error[too-deep]: expression nests too deeply (over 100 parse "
        "levels, about 45 nested parentheses); split it into simpler terms")
    source, caret = str(error).splitlines()[-2:]
    assert source[caret.index("^"):].startswith("not")


def test_too_large_in_a_rule_file() -> None:
    expression = "trace.has(a) or " * 4096 + "trace.has(b)"
    text = f"rules:\n  - id: r1\n    condition: {expression}\n"
    error = load_error(text)
    assert str(error) == (
        f"rules.yaml:3:16: error[too-large]: expression is {len(expression)} bytes; the limit is "
        "65536\n"
        f" 3 |     condition: {expression[:105]}...\n"
        "   |                ^")


def test_lone_surrogate_escape_is_an_error_not_a_crash() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            '    condition: "trace.has(\\"\\ud800\\")"\n')
    error = load_error(text)
    assert (error.location.line, error.location.column) == (3, 29)  # under `\ud800`
    assert error.message == "character '\\ud800' is not valid Unicode text"


def test_load_rules_reports_the_real_file_path(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n"
                    "  - id: r1\n"
                    "    condition: >-\n"
                    "      trace.has(a)\n"
                    "      and x.where(b = 2)\n")
    with pytest.raises(RuleLoadError) as raised:
        load_rules([path])
    assert str(raised.value) == (
        f"{path}:5:21: error[syntax]: unexpected character '='; expected a comparison "
        "(== != < <= > >=), in, matches, contains, and, or, ')' ('=' is not an operator; did you "
        "mean '=='?)\n"
        " 5 |       and x.where(b = 2)\n"
        "   |                     ^")


def test_every_expression_error_of_a_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("rules:\n"
                    "  - id: r1\n"
                    "    condition: x.where(a = 1)\n"
                    "  - id: r2\n"
                    "    condition: count(x) > 1.5\n"
                    "  - id: r3\n"
                    "    when: trace.has(a)\n"
                    "    never: 'y.where(b matches \"[\")'\n")
    with pytest.raises(RuleLoadError) as raised:
        load_rules([path])
    places = [(e.rule_id, e.location.line, e.location.column, e.code)
              for e in raised.value.errors]
    assert places == [("r1", 3, 26, "syntax"), ("r2", 5, 27, "syntax"),
                      ("r3", 8, 31, "bad-regex")]


def test_snippet_is_the_line_the_location_names_despite_unicode_line_separators() -> None:
    # U+2028 and U+0085 are not line breaks for our line numbers, so the snippet must not be
    # taken from a list of lines that treats them as such.
    text = ("rules:\n"
            "  - id: r1\n"
            "    description: \"owned by payments\u2028reviewed\x85by sre\"\n"
            "    condition: x.where(a = 1)\n")
    error = load_error(text)
    assert (error.location.line, error.location.column) == (4, 26)
    assert str(error).splitlines()[1:] == [
        " 4 |     condition: x.where(a = 1)",
        "   |                          ^"]


def test_crlf_line_endings() -> None:
    text = "rules:\r\n  - id: r1\r\n    condition: x.where(a = 1)\r\n"
    assert str(load_error(text)).splitlines()[1:] == [
        " 3 |     condition: x.where(a = 1)",
        "   |                          ^"]


# --- numbers beyond what a span can hold (issue: a 5,000-digit literal killed the reload) -----

@pytest.mark.parametrize(("literal", "message"), [
    ("9" * 5000, "integer 9999999999...999999 (5000 characters) is out of range: span attributes "
                 "hold 64-bit integers, from -9223372036854775808 to 9223372036854775807"),
    ("9223372036854775808", "integer 9223372036854775808 is out of range: span attributes hold "
                            "64-bit integers, from -9223372036854775808 to 9223372036854775807"),
    ("1e999", "number 1e999 is out of range for a double"),
])
def test_a_number_no_span_can_hold_is_a_located_error(literal: str, message: str) -> None:
    text = f"trace.has(order).where(total > {literal})"
    error = expression_error(text)
    assert (error.message, error.code, error.start) == (message, "out-of-range", 31)
    if "e" not in literal:  # (a count compares with integers only)
        count = expression_error(f"trace.count(order) > {literal}")
        assert (count.message, count.start) == (message, 21)


def test_the_integer_bounds_themselves_are_accepted() -> None:
    for literal in ("9223372036854775807", "-9223372036854775808", "0001", "1.5e308"):
        compile_expression(f"trace.has(order).where(total > {literal})")


def test_a_within_beyond_64_bit_nanoseconds_is_a_located_error() -> None:
    error = expression_error("a before b within 9999999999999999999h")
    assert (error.message, error.start) == (
        "duration '9999999999999999999h' is too long: the limit is about 292 years", 18)


def test_a_5000_digit_literal_in_a_rule_file_names_its_line_and_column(tmp_path: Path) -> None:
    error = load_error("rules:\n  - id: big\n    condition: count(order) > " + "9" * 5000 + "\n")
    assert (error.location.line, error.location.column) == (3, 31)
    assert "out of range" in str(error)


# --- calls the language does not have -----------------------------------------------------------

NO_STRING_FUNCTIONS = ("the language has no string functions; test the attribute itself: == "
                       "compares case-sensitively, contains \"text\" finds a substring, matches "
                       "\"(?i)^text$\" ignores case")


@pytest.mark.parametrize(("text", "message", "column", "width"), [
    ('lower(x) == "a"', f"unknown function 'lower': {NO_STRING_FUNCTIONS}", 1, 5),
    ('x.where(lower(a) == "b")', f"unknown function 'lower': {NO_STRING_FUNCTIONS}", 9, 5),
    ("trace.exists(payment.charge)",
     "unknown function 'trace.exists'; did you mean 'trace.has'?", 1, 12),
    ("has(payment.charge)", "unknown function 'has'; did you mean 'trace.has'?", 1, 3),
    ("Count(x) > 1", "unknown function 'Count'; did you mean 'count'?", 1, 5),
    ("exists(x)", "unknown function 'exists'; the functions are trace.has(...), trace.count(...) "
     "and count(...), and the method .where(...)", 1, 6),
    ("payment.charge.wher(attempt > 1)", "'.wher(' is not a method; did you mean '.where('?",
     15, 5),
    ("count(x).were(a > 1) > 2", "'.were(' is not a method; did you mean '.where('?", 9, 5),
    ("trace.has(x).where(a > 1).filter(b)",
     "'.filter(' is not a method; the only method is .where(...)", 26, 7),
])
def test_an_unknown_function_is_named_with_the_nearest_real_one(
        text: str, message: str, column: int, width: int) -> None:
    error = expression_error(text)
    assert (error.message, error.code) == (message, "unknown-function")
    assert str(error).splitlines()[-1] == "   | " + " " * (column - 1) + "^" * width


def test_an_unknown_function_in_a_rule_file_points_at_its_name() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            "    condition: |\n"
            "      payment.charge.where(attempt > 1)\n"
            "        and trace.exists(refund.issued)\n")
    assert str(load_error(text)) == (
        "rules.yaml:5:13: error[unknown-function]: unknown function 'trace.exists'; did you "
        "mean 'trace.has'?\n"
        " 5 |         and trace.exists(refund.issued)\n"
        "   |             ^^^^^^^^^^^^")


@pytest.mark.parametrize("text", [
    "x.where(count(a) > 1)",  # a real function where it cannot stand: the plain syntax error
    "x before y within(2s)",  # a keyword before '(' is no function
    "foo (x)",  # a name and a parenthesis apart are no call
])
def test_what_is_no_unknown_call_keeps_the_plain_syntax_error(text: str) -> None:
    error = expression_error(text)
    assert (error.code, error.message.startswith("unexpected '('")) == ("syntax", True)


# --- YAML that cannot hold an expression as written ---------------------------------------------

QUOTE_IT = ("quote the expression with single quotes or write it as a block scalar: `{key}: |` "
            "and the expression on the next line")


@pytest.mark.parametrize(("line", "key", "column"), [
    ("    condition: trace.has(a): b", "condition", 28),  # `: ` inside a plain scalar
    ('    when: x.where(route == "/a: b")', "when", 31),
    ('    condition: "GET /x".where(status == ERROR)', "condition", 24),  # a leading quote
    ("    condition: [a, b] and c", "condition", 23),
    ("    condition: *.where(a > 1)", "condition", 17),
    ("    condition: `x` and y", "condition", 16),
])
def test_a_yaml_error_in_an_expression_says_how_to_quote_it(
        line: str, key: str, column: int) -> None:
    error = load_error(f"rules:\n  - id: r1\n{line}\n    never: y\n")
    assert error.code == "yaml"
    assert error.message.endswith("; " + QUOTE_IT.format(key=key)), error.message
    assert (error.location.line, error.location.column) == (3, column)


def test_a_yaml_error_in_a_macro_or_a_continued_expression_says_how_to_quote_it() -> None:
    macro = load_error("macros:\n  big: amount: 3\nrules:\n  - id: r1\n    condition: x\n")
    assert macro.message == ("invalid YAML: mapping values are not allowed here; "
                             + QUOTE_IT.format(key="big"))
    continued = load_error("rules:\n  - id: r1\n    condition: x\n      and y: z\n")
    assert continued.message.endswith(QUOTE_IT.format(key="condition"))
    assert (continued.location.line, continued.location.column) == (4, 12)


def test_a_yaml_error_elsewhere_has_no_quoting_hint() -> None:
    for text in ("rules:\n  - id: r1\n    name: a: b\n    condition: x\n",
                 "rules:\n  - id: a\n   condition: x\n"):  # indentation, at the key itself
        assert "quote the expression" not in load_error(text).message


def test_an_expression_cut_by_a_yaml_comment_says_how_to_quote_it() -> None:
    text = ("rules:\n"
            "  - id: r1\n"
            '    condition: http.request.where(url matches "^/a #b")\n')
    assert str(load_error(text)) == (
        "rules.yaml:3:47: error[syntax]: unexpected character '\"'; expected a \"quoted string\" "
        "(YAML ended the expression at ' #', which starts a comment; "
        + QUOTE_IT.format(key="condition") + ")\n"
        ' 3 |     condition: http.request.where(url matches "^/a #b")\n'
        "   |                                               ^")
    noted = load_error("macros:\n  big: amount = 1  # a note\nrules:\n  - id: r1\n"
                       "    condition: x.where(big)\n")
    assert noted.location.line == 2  # nothing left open: the comment is a real one
    assert "YAML ended the expression" not in noted.message
    cut = load_error("macros:\n  big: (amount > 1 #0)\nrules:\n  - id: r1\n"
                     "    condition: x.where(big)\n")
    assert cut.message.endswith(QUOTE_IT.format(key="big") + ")")

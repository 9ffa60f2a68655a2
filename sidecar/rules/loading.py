"""Rule files to a RuleSet: read the files, check every rule, compile, and index what they read.

Loading is all-or-nothing and reports every problem at once: `load_rules` raises a
RuleLoadError listing each error with file, line and column, so `check` shows them all and a
running sidecar keeps its last good rules.

The files loaded together share their `lists:` and `macros:`, so every file is read before any
rule is compiled: a rule may use a macro declared in a file read after its own.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from sidecar.dsl import (
    NO_DEFINITIONS,
    CompiledExpr,
    Definitions,
    Macro,
    check_macro,
    combine_clauses,
    combine_for_each,
    compile_clause,
    compile_expression,
    compile_selector,
    name_error,
    parse_literal,
)
from sidecar.model.errors import ExpressionError, Location, RuleError, RuleLoadError
from sidecar.rules.compact import CompactSpanError, otlp_value, trace_from_compact
from sidecar.rules.ruleset import (
    SEVERITIES,
    Declaration,
    Example,
    Expected,
    Rule,
    RuleSet,
    rule_form,
)
from sidecar.rules.yaml_source import YamlSource, is_string, mapping_items, quoting_hint

RULE_KEYS = ("id", "name", "severity", "description", "condition", "when", "for_each", "always",
             "never",
             "signal", "tags", "enabled", "examples")
SIGNAL_KEYS = ("message", "context")
# what a test may assert about the signal besides `violates` (each needs `violates: true`)
ASSERTION_KEYS = ("message", "context", "offending")
EXAMPLE_KEYS = ("description", "violates", "spans", *ASSERTION_KEYS)
TEST_KEYS = ("rule", "description", "violates", "spans", *ASSERTION_KEYS, "file", "expect")
EXPECT_KEYS = ("trace_id", "message", "context")  # an expected signal of a file test
FILE_KEYS = ("rules", "tests", "lists", "macros")
RULE_FILE_SUFFIXES = (".yaml", ".yml")
_KEBAB = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")
_INVALID: Any = object()  # a YAML value that could not be constructed (already reported)


def rule_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[RuleError]]:
    """Files named, and YAML files under directories named (recursively; hidden entries, such
    as a Kubernetes ConfigMap's ..data, are skipped)."""
    files, errors = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.suffix in RULE_FILE_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                errors.append(RuleError(f"no rule files (*.yaml, *.yml) in directory {path}",
                                        Location(str(path), 0, 0), code="io"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            errors.append(RuleError("no such file or directory", Location(str(path), 0, 0),
                                    code="io"))
    return files, errors


def load_rules(paths: Sequence[str | Path]) -> RuleSet:
    """Load every rule file under `paths`; raise RuleLoadError listing all errors if any."""
    files, errors = rule_files(paths)
    loader = _Loader(errors)
    digest = hashlib.sha256()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(RuleError(f"cannot read: {exc}", Location(str(path), 0, 0), code="io"))
            continue
        digest.update(f"{path}\0{text}\0".encode())  # (lists and macros included)
        loader.read_file(str(path), text)
    loader.finish()
    if errors:
        raise RuleLoadError(errors)
    return RuleSet(
        rules=tuple(r for r in loader.rules if r.enabled),
        disabled=tuple(r for r in loader.rules if not r.enabled),
        examples=tuple(loader.examples),
        files=tuple(str(p) for p in files),
        digest=digest.hexdigest(),
        declarations=loader.declarations(),
    )


def load_rules_text(text: str, path: str = "<rules>") -> RuleSet:
    """Load one rule document from a string (tests, the demo, embedded rules)."""
    errors: list[RuleError] = []
    loader = _Loader(errors)
    loader.read_file(path, text)
    loader.finish()
    if errors:
        raise RuleLoadError(errors)
    return RuleSet(tuple(r for r in loader.rules if r.enabled),
                   tuple(r for r in loader.rules if not r.enabled), tuple(loader.examples),
                   (path,), hashlib.sha256(text.encode()).hexdigest(), loader.declarations())


class _Loader:
    """Walks rule documents, appending every problem to `errors` instead of stopping."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = errors
        self.rules: list[Rule] = []
        self.examples: list[Example] = []
        self._seen_ids: dict[str, Location] = {}
        self._tests: list[tuple[YamlSource, yaml.Node, Example]] = []
        self._documents: list[tuple[YamlSource, dict[str, yaml.Node]]] = []
        self._declared: dict[str, tuple[str, Location]] = {}  # list or macro name: (kind, where)
        self._lists: dict[str, tuple[Any, ...]] = {}
        self._macros: list[tuple[YamlSource, yaml.ScalarNode, Macro]] = []
        self.definitions = NO_DEFINITIONS

    def read_file(self, path: str, text: str) -> None:
        """Read one file's YAML and its lists and macros; its rules wait for `finish`."""
        try:
            doc = YamlSource(path, text)
        except RuleError as exc:
            self.errors.append(exc)
            return
        if doc.root is None or (isinstance(doc.root, yaml.ScalarNode)
                                and doc.root.tag == "tag:yaml.org,2002:null"):
            return  # an empty file (or a lone `---`) holds no rules; not an error
        if not isinstance(doc.root, yaml.MappingNode):
            self._error(doc, doc.root, "a rule file is a mapping with a 'rules:' list",
                        code="schema")
            return
        fields = self._fields(doc, doc.root, FILE_KEYS, "rule file")
        for name, _, node in self._declarations(doc, fields.get("lists"), "list"):
            items = self._list_items(doc, node, name)
            if items is not None:
                self._lists[name] = items
        for name, key_node, node in self._declarations(doc, fields.get("macros"), "macro"):
            if not is_string(node):
                self._error(doc, node, f"macro '{name}' must be a rule expression (a string)",
                            "schema")
                continue
            where = doc.location(key_node)
            self._macros.append((doc, node, Macro(name, node.value, f"{where.file}:{where.line}",
                                                  len(self._macros))))
        self._documents.append((doc, fields))

    def finish(self) -> None:
        """Check the macros, then every file's rules and tests, now that all names are known."""
        self.definitions = self._checked_definitions()
        for doc, fields in self._documents:
            for key in ("rules", "tests"):
                node = fields.get(key)
                if node is None or node.tag == "tag:yaml.org,2002:null":
                    continue  # absent, or every entry commented out
                if not isinstance(node, yaml.SequenceNode):
                    self._error(doc, node, f"'{key}' must be a list", code="schema")
                    continue
                for item in node.value:
                    if key == "rules":
                        self._rule(doc, item)
                    else:
                        self._test(doc, item)
        self._resolve_tests()

    def declarations(self) -> tuple[Declaration, ...]:
        """Every list and macro name, with where it is declared."""
        return tuple(Declaration(name, kind, where)
                     for name, (kind, where) in self._declared.items())

    def _declarations(self, doc: YamlSource, node: yaml.Node | None,
                      kind: str) -> list[tuple[str, yaml.ScalarNode, yaml.Node]]:
        """(name, key node, value node) of each new name in a `lists:` or `macros:` mapping,
        after reporting bad and repeated names (lists and macros share one namespace)."""
        if node is None or node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, yaml.MappingNode):
            self._error(doc, node, f"'{kind}s' must be a mapping from names to "
                        f"{'lists' if kind == 'list' else 'expressions'}", code="schema")
            return []
        found = []
        for key_node, value_node in mapping_items(node):
            if not isinstance(key_node, yaml.ScalarNode):
                self._error(doc, key_node, f"a {kind} name must be a plain name", "bad-name")
                continue
            name = key_node.value  # as written: a name such as `NO` is not a YAML boolean here
            problem = name_error(name)
            first = self._declared.get(name)
            if problem:
                self._error(doc, key_node, problem, "bad-name")
            elif first is not None:
                self._error(doc, key_node, f"duplicate {kind} name '{name}' (first declared as "
                            f"a {first[0]} at {first[1]})", "duplicate-name")
            else:
                self._declared[name] = (kind, doc.location(key_node))
                found.append((name, key_node, value_node))
        return found

    def _list_items(self, doc: YamlSource, node: yaml.Node,
                    name: str) -> tuple[Any, ...] | None:
        """A list's items, each read as a literal of the rule language: a plain item is a
        number, `true`/`false` or else a string (YAML's own `NO`, `on` or `null` are strings);
        a quoted item is a string."""
        if not isinstance(node, yaml.SequenceNode):
            self._error(doc, node, f"list '{name}' must be a YAML list of literals, such as "
                        "[USD, EUR, 5]", "schema")
            return None
        items = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                kind = "list" if isinstance(item, yaml.SequenceNode) else "mapping"
                self._error(doc, item, f"an item of list '{name}' is a literal (a string, a "
                            f"number, true or false), not a {kind}", "schema")
                return None
            try:
                items.append(parse_literal(item.value) if item.style is None else item.value)
            except ValueError as exc:
                self._error(doc, item, str(exc), "out-of-range")
                return None
        return tuple(items)

    def _checked_definitions(self) -> Definitions:
        """Every list, and each macro whose body is sound, checked in declaration order: a
        broken macro is reported where it is declared, and left out."""
        if not self._lists and not self._macros:
            return NO_DEFINITIONS  # (parses stay cached from one reload to the next)
        sound = [macro for _, _, macro in self._macros]
        definitions = Definitions(self._lists, sound)
        for doc, node, macro in self._macros:
            try:
                check_macro(macro, definitions)
            except ExpressionError as exc:
                location = doc.expression_location(node, exc.start, exc.end)
                self.errors.append(RuleError(_cut_hinted(doc, node, macro.name, exc.message),
                                             location, exc.code))
                sound.remove(macro)
                definitions = Definitions(self._lists, sound)
        return definitions

    def _error(self, doc: YamlSource, node: yaml.Node, message: str, code: str = "rule",
               rule_id: str | None = None) -> None:
        self.errors.append(RuleError(message, doc.location(node), code, rule_id))

    def _fields(self, doc: YamlSource, node: yaml.Node, allowed: Sequence[str],
                what: str, rule_id: str | None = None) -> dict[str, yaml.Node]:
        """A mapping's values by key, reporting unknown and repeated keys."""
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in mapping_items(node):
            if not isinstance(key_node, yaml.ScalarNode):
                self._error(doc, key_node, f"a key in {what} must be a plain name, not a "
                            f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}",
                            "unknown-key", rule_id)
                continue
            key = key_node.value
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else \
                    f"; expected one of: {', '.join(allowed)}"
                self._error(doc, key_node, f"unknown key '{key}' in {what}{hint}",
                            "unknown-key", rule_id)
            elif key in fields:
                self._error(doc, key_node, f"'{key}' is given twice in {what}",
                            "duplicate-key", rule_id)
            else:
                fields[key] = value_node
        return fields

    def _string(self, doc: YamlSource, fields: dict[str, yaml.Node], key: str,
                rule_id: str | None, required: bool = False) -> str | None:
        node = fields.get(key)
        if node is None:
            return None
        if not is_string(node) and not (isinstance(node, yaml.ScalarNode) and not required):
            self._error(doc, node, f"'{key}' must be a string", "schema", rule_id)
            return None
        return str(node.value)

    def _rule(self, doc: YamlSource, node: yaml.Node) -> None:
        if not isinstance(node, yaml.MappingNode):
            self._error(doc, node, "each rule is a mapping with at least 'id' and 'condition' "
                        "(or 'when' with 'always'/'never')", "schema")
            return
        id_node = next((v for k, v in mapping_items(node)
                        if isinstance(k, yaml.ScalarNode) and k.value == "id"), None)
        rule_id = str(id_node.value) if isinstance(id_node, yaml.ScalarNode) else None
        fields = self._fields(doc, node, RULE_KEYS, f"rule '{rule_id}'" if rule_id else "rule",
                              rule_id)
        before = len(self.errors)
        if not self._valid_id(doc, node, id_node, rule_id):
            rule_id = None
        severity = self._string(doc, fields, "severity", rule_id) or "medium"
        if "severity" in fields and severity not in SEVERITIES:
            close = difflib.get_close_matches(severity, SEVERITIES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self._error(doc, fields["severity"], f"severity '{severity}' is not one of "
                        f"{', '.join(SEVERITIES)}{hint}", "bad-severity", rule_id)
        logic = self._logic(doc, node, fields, rule_id)
        message, context = self._signal(doc, fields.get("signal"), rule_id)
        tags = self._string_list(doc, fields.get("tags"), "tags", rule_id)
        enabled = self._bool(doc, fields.get("enabled"), "enabled", rule_id, default=True)
        name = self._string(doc, fields, "name", rule_id) or rule_id or ""
        examples = self._examples(doc, fields.get("examples"), rule_id)
        if len(self.errors) > before or logic is None or rule_id is None:
            return
        self.examples.extend(examples)
        self.rules.append(Rule(
            id=rule_id, name=name, severity=severity,
            description=(self._string(doc, fields, "description", rule_id) or "").strip(),
            message=(message or name).strip(), context=tuple(context), tags=tuple(tags),
            enabled=enabled, form=rule_form(fields), logic=logic, location=doc.location(node),
        ))

    def _valid_id(self, doc: YamlSource, node: yaml.Node, id_node: yaml.Node | None,
                  rule_id: str | None) -> bool:
        if id_node is None or rule_id is None:
            self._error(doc, node, "rule has no 'id'", "schema")
            return False
        if not is_string(id_node) or not _KEBAB.fullmatch(rule_id):
            self._error(doc, id_node, f"id '{rule_id}' must be kebab-case, such as "
                        "'payment-retry-idempotency'", "bad-id", rule_id)
            return False
        first = self._seen_ids.get(rule_id)
        if first is not None:
            self._error(doc, id_node, f"duplicate rule id '{rule_id}' (first defined at "
                        f"{first})", "duplicate-id", rule_id)
            return False
        self._seen_ids[rule_id] = doc.location(id_node)
        return True

    def _logic(self, doc: YamlSource, node: yaml.Node, fields: dict[str, yaml.Node],
               rule_id: str | None) -> CompiledExpr | None:
        """`condition`, or `when` or `for_each` with `always`/`never`: exactly one shape."""
        condition, when = fields.get("condition"), fields.get("when")
        always, never = fields.get("always"), fields.get("never")
        if "for_each" in fields:
            return self._for_each(doc, fields, rule_id)
        if condition is not None:
            for key in ("when", "always", "never"):
                if key in fields:
                    self._error(doc, fields[key], f"'{key}' cannot be combined with "
                                "'condition'; use one shape or the other", "schema", rule_id)
                    return None
            return self._compile(doc, condition, "condition", rule_id, compile_expression)
        if when is None:
            for key in ("always", "never"):
                if key in fields:
                    self._error(doc, fields[key], f"'{key}' needs a 'when' clause",
                                "schema", rule_id)
                    return None
            self._error(doc, node, "rule has neither 'condition' nor 'when'", "schema", rule_id)
            return None
        if always is None and never is None:
            self._error(doc, when, "a 'when' rule needs 'always' or 'never' (or both)",
                        "missing-always-never", rule_id)
            return None
        parts = [self._compile(doc, n, key, rule_id, compile_clause) if n is not None else None
                 for key, n in (("when", when), ("always", always), ("never", never))]
        if parts[0] is None or any(n is not None and p is None
                                   for n, p in zip((always, never), parts[1:])):
            return None
        return combine_clauses(parts[0], parts[1], parts[2])

    def _for_each(self, doc: YamlSource, fields: dict[str, yaml.Node],
                  rule_id: str | None) -> CompiledExpr | None:
        """`for_each` with `always`/`never`: the clauses are checked once per selected span."""
        each, always, never = fields["for_each"], fields.get("always"), fields.get("never")
        for key in ("when", "condition"):
            if key in fields:
                self._error(doc, fields[key], f"'{key}' cannot be combined with 'for_each': a "
                            "for_each rule is checked for every span it selects; put the "
                            "test in 'always' or 'never'", "schema", rule_id)
                return None
        if always is None and never is None:
            self._error(doc, each, "a 'for_each' rule needs 'always' or 'never' (or both)",
                        "missing-always-never", rule_id)
            return None
        selector = self._compile(doc, each, "for_each", rule_id, compile_selector)
        clauses = [self._compile(doc, n, key, rule_id,
                                 lambda text, names: compile_clause(text, names, for_each=True))
                   if n is not None else None for key, n in (("always", always), ("never", never))]
        if selector is None or any(n is not None and c is None
                                   for n, c in zip((always, never), clauses)):
            return None
        return combine_for_each(selector, clauses[0], clauses[1])

    def _compile(self, doc: YamlSource, node: yaml.Node, key: str, rule_id: str | None,
                 compiler: Callable[[str, Definitions], CompiledExpr]) -> CompiledExpr | None:
        if not is_string(node):
            self._error(doc, node, f"'{key}' must be a rule expression (a string)", "schema",
                        rule_id)
            return None
        try:
            return compiler(node.value, self.definitions)
        except ExpressionError as exc:
            location = doc.expression_location(node, exc.start, exc.end)
            self.errors.append(RuleError(_cut_hinted(doc, node, key, exc.message), location,
                                         exc.code, rule_id))
            return None

    def _signal(self, doc: YamlSource, node: yaml.Node | None,
                rule_id: str | None) -> tuple[str | None, list[str]]:
        if node is None:
            return None, []
        if not isinstance(node, yaml.MappingNode):
            self._error(doc, node, "'signal' must be a mapping with 'message' and 'context'",
                        "schema", rule_id)
            return None, []
        fields = self._fields(doc, node, SIGNAL_KEYS, "signal", rule_id)
        return (self._string(doc, fields, "message", rule_id),
                self._string_list(doc, fields.get("context"), "signal.context", rule_id))

    def _string_list(self, doc: YamlSource, node: yaml.Node | None, what: str,
                     rule_id: str | None) -> list[str]:
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode) or not all(map(is_string, node.value)):
            self._error(doc, node, f"'{what}' must be a list of strings", "schema", rule_id)
            return []
        return [item.value for item in node.value]

    def _value(self, doc: YamlSource, node: yaml.Node, rule_id: str | None) -> Any:
        """A node's Python value, or _INVALID after reporting why it has none."""
        try:
            return doc.value(node)
        except RuleError as exc:
            self.errors.append(RuleError(exc.message, exc.location, exc.code, rule_id))
            return _INVALID

    def _bool(self, doc: YamlSource, node: yaml.Node | None, what: str, rule_id: str | None,
              default: bool) -> bool:
        if node is None:
            return default
        value = self._value(doc, node, rule_id)
        if value is _INVALID:
            return default
        if not isinstance(value, bool):
            self._error(doc, node, f"'{what}' must be true or false", "schema", rule_id)
            return default
        return value

    def _examples(self, doc: YamlSource, node: yaml.Node | None,
                  rule_id: str | None) -> list[Example]:
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            self._error(doc, node, "'examples' must be a list", "schema", rule_id)
            return []
        found = []
        for item in node.value:
            if not isinstance(item, yaml.MappingNode):
                self._error(doc, item, "an example is a mapping with 'violates' and 'spans'",
                            "schema", rule_id)
                continue
            fields = self._fields(doc, item, EXAMPLE_KEYS, "example", rule_id)
            example = self._example(doc, item, fields, rule_id, "example")
            if example is not None and rule_id is not None:
                found.append(example)
        return found

    def _example(self, doc: YamlSource, node: yaml.Node, fields: dict[str, yaml.Node],
                 rule_id: str | None, kind: str) -> Example | None:
        """Check one example's (or test's) spans and what it asserts about the signal."""
        if "file" in fields:
            return self._file_test(doc, node, fields, rule_id)
        if "violates" not in fields or "spans" not in fields:
            needs = "an example needs 'violates: true|false' and 'spans'" if kind == "example" \
                else "a test needs 'violates: true|false' and 'spans' (or 'file' and 'expect')"
            self._error(doc, node, needs, "schema", rule_id)
            return None
        violates = self._bool(doc, fields["violates"], "violates", rule_id, default=False)
        spans = self._value(doc, fields["spans"], rule_id)
        if spans is _INVALID:
            return None
        try:
            trace_from_compact(spans)
        except CompactSpanError as exc:
            at = fields["spans"]
            if isinstance(at, yaml.SequenceNode) and exc.index < len(at.value):
                at = at.value[exc.index]
            self._error(doc, at, str(exc), "bad-span", rule_id)
            return None
        description = self._value(doc, fields["description"], rule_id) \
            if "description" in fields else ""
        expected = self._expected(doc, fields, rule_id)
        if description is _INVALID or expected is None:
            return None
        asserted = next((key for key in ASSERTION_KEYS if key in fields), None)
        if asserted is not None and not violates:
            self._error(doc, fields[asserted], f"'{asserted}' asserts what the signal says, but "
                        f"this {kind} expects no signal (violates: false)", "schema", rule_id)
            return None
        return Example(rule_id or "", str(description), violates, spans, doc.location(node),
                       kind, expected)

    def _expected(self, doc: YamlSource, fields: dict[str, yaml.Node], rule_id: str | None,
                  trace_id: str | None = None) -> Expected | None:
        """The `message`, `context` and `offending` a signal must have (None after reporting
        why they cannot be read)."""
        before = len(self.errors)
        message = self._string(doc, fields, "message", rule_id)
        context: Any = {}
        if "context" in fields:
            context = self._value(doc, fields["context"], rule_id)
            if context is not _INVALID and not isinstance(context, dict):
                self._error(doc, fields["context"], "'context' must be a mapping from the "
                            "signal's context keys to their values", "schema", rule_id)
        offending = self._string_list(doc, fields.get("offending"), "offending", rule_id)
        if len(self.errors) > before:
            return None
        return Expected(trace_id, message, {str(k): otlp_value(v) for k, v in context.items()},
                        tuple(offending) if "offending" in fields else None)

    def _file_test(self, doc: YamlSource, node: yaml.Node, fields: dict[str, yaml.Node],
                   rule_id: str | None) -> Example | None:
        """A test over a captured OTLP JSON file (its path relative to the test file), listing
        under `expect` every signal the rule must give on the file's traces."""
        for key in ("violates", "spans", *ASSERTION_KEYS):
            if key in fields:
                self._error(doc, fields[key], f"'{key}' cannot be combined with 'file': a file "
                            "test lists the signals it expects under 'expect'", "schema", rule_id)
                return None
        file_node, expect_node = fields["file"], fields.get("expect")
        if not is_string(file_node):
            self._error(doc, file_node, "'file' must be a path (a string)", "schema", rule_id)
            return None
        path = Path(doc.path).parent / file_node.value
        if not path.is_file():
            self._error(doc, file_node, f"no such file: {path}", "io", rule_id)
            return None
        if not isinstance(expect_node, yaml.SequenceNode):
            self._error(doc, expect_node or node, "a file test needs 'expect': a list of the "
                        "signals the rule must give, such as [{trace_id: <32 hex digits>}] "
                        "([] for none)", "schema", rule_id)
            return None
        expect: dict[str, Expected] = {}
        for item in expect_node.value:
            expected = self._expected_signal(doc, item, rule_id)
            if expected is None or expected.trace_id is None:
                continue
            if expected.trace_id in expect:
                self._error(doc, item, f"trace {expected.trace_id} is expected twice (a rule "
                            "signals at most once per trace)", "schema", rule_id)
            expect[expected.trace_id] = expected
        description = self._value(doc, fields["description"], rule_id) \
            if "description" in fields else ""
        if description is _INVALID or len(expect) < len(expect_node.value):
            return None
        return Example(rule_id or "", str(description), bool(expect), None, doc.location(node),
                       "test", file=str(path), expect=tuple(expect.values()))

    def _expected_signal(self, doc: YamlSource, node: yaml.Node,
                         rule_id: str | None) -> Expected | None:
        """One item of a file test's `expect`: a trace id, and what its signal says."""
        if not isinstance(node, yaml.MappingNode):
            self._error(doc, node, "each expected signal is a mapping with 'trace_id'",
                        "schema", rule_id)
            return None
        fields = self._fields(doc, node, EXPECT_KEYS, "expected signal", rule_id)
        trace_node = fields.get("trace_id")
        if trace_node is None or not is_string(trace_node) \
                or not _TRACE_ID.fullmatch(trace_node.value):
            self._error(doc, trace_node or node, "an expected signal needs 'trace_id': the "
                        "trace id as OTLP JSON writes it (32 hex digits)", "schema", rule_id)
            return None
        return self._expected(doc, fields, rule_id, str(trace_node.value).lower())

    def _test(self, doc: YamlSource, node: yaml.Node) -> None:
        """A standalone test case: like an example, but naming its rule with `rule:`."""
        fields = self._fields(doc, node, TEST_KEYS, "test") \
            if isinstance(node, yaml.MappingNode) else {}
        rule_node = fields.get("rule")
        if rule_node is None or not is_string(rule_node):
            self._error(doc, node, "a test needs 'rule: <rule id>'", "schema")
            return
        example = self._example(doc, node, fields, rule_node.value, "test")
        if example is not None:
            self._tests.append((doc, rule_node, example))

    def _resolve_tests(self) -> None:
        """Standalone tests may name rules from any file; check the names once all are read."""
        known = {r.id for r in self.rules} | set(self._seen_ids)
        for doc, rule_node, example in self._tests:
            if example.rule_id not in known:
                close = difflib.get_close_matches(example.rule_id, sorted(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self._error(doc, rule_node, f"test names unknown rule '{example.rule_id}'{hint}",
                            "unknown-rule")
            else:
                self.examples.append(example)


def _cut_hinted(doc: YamlSource, node: yaml.ScalarNode, key: str, message: str) -> str:
    """`message`, saying how to quote the expression when a YAML comment cut it short."""
    if not doc.cut_by_comment(node):
        return message
    return (f"{message} (YAML ended the expression at ' #', which starts a comment; "
            f"{quoting_hint(key)})")

"""YAML with positions: every value keeps its node, so errors point into the file.

PyYAML's composer gives nodes with marks; this module turns marks (and offsets inside an
expression held by a scalar, whatever its quoting or block style) into `Location`s.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from typing import Any

import yaml

from sidecar.model.errors import Location, RuleError

# The keys whose values are rule expressions (with the names under `macros:`)
EXPRESSION_KEYS = ("condition", "when", "always", "never", "for_each")
_KEY_LINE = re.compile(r"(\s*)(?:-\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*:(?:\s|$)")
_MAX_ALIGN_SCAN = 256  # how far to look for the next character of a scalar in its source
MAX_NESTING = 64  # YAML nesting deeper than this is refused: composing it recurses per level


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deep enough to exhaust Python's stack, and aliases inside
    their own anchor (a structure that contains itself)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} refers to a node that contains it",
                    event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_NESTING:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_NESTING} levels deep", event.start_mark)
        anchor = event.anchor
        self._depth += 1
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)


class YamlSource:
    """One YAML file: its text, its root node, and the way from nodes back to lines."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        # Lines are split at "\n" only, as line numbers are counted (not at \x85 or \u2028).
        self.lines = [line.removesuffix("\r") for line in text.split("\n")]
        self._line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        try:
            self._loader = _BoundedLoader(text)  # checks for unprintable characters at once
            self.root: yaml.Node | None = self._loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = exc.problem or exc.context or "invalid YAML"
            key = self.expression_key(mark.line, mark.column) if mark else None
            hint = f"; {quoting_hint(key)}" if key else ""
            raise RuleError(f"invalid YAML: {what}{hint}",
                            self._location_at(mark.index if mark else 0), code="yaml") from None
        except yaml.reader.ReaderError as exc:
            raise RuleError(f"invalid YAML: character {exc.character:#06x} is not allowed "
                            "(unprintable)", self._location_at(exc.position), code="yaml") from None

    def expression_key(self, line: int, column: int) -> str | None:
        """The key whose value holds (`line`, `column`), 0-based, when that value is a rule
        expression (a logic key, or a name under `macros:`): found by indentation, since the
        text did not parse."""
        text = self.lines[line] if line < len(self.lines) else ""
        if not text.strip():
            return None
        match = _KEY_LINE.match(text)
        if match and column < match.end():
            return None  # at the key itself (bad indentation, say), not in its value
        owner = (line, match.group(2)) if match else self._owner(line, _indent(text))
        if owner is None:
            return None
        key_line, key = owner
        if key in EXPRESSION_KEYS:
            return key
        parent = self._owner(key_line, _indent(self.lines[key_line]))
        return key if parent is not None and parent[1] == "macros" else None

    def cut_by_comment(self, node: yaml.ScalarNode) -> bool:
        """A plain scalar that ends where ` #` starts a comment, leaving an expression open (a
        parenthesis or a double quote unclosed): YAML cut it there."""
        if node.style is not None:
            return False
        rest = self.text[node.end_mark.index:].split("\n", 1)[0]
        text = node.value
        return rest.lstrip(" \t").startswith("#") and (
            text.count("(") > text.count(")") or text.count('"') % 2 == 1)

    def _owner(self, line: int, indent: int) -> tuple[int, str] | None:
        """The nearest line before `line` indented less than `indent`, as (line, its key), if
        it holds a key."""
        for index in range(line - 1, -1, -1):
            if _indent(self.lines[index]) < indent:
                match = _KEY_LINE.match(self.lines[index])
                return (index, match.group(2)) if match else None
        return None

    def value(self, node: yaml.Node) -> Any:
        """The Python value of a node (plain types only: SafeLoader)."""
        try:
            return self._loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise RuleError(f"invalid YAML value: {exc.problem}", self.location(node),
                            code="yaml") from None
        except (ValueError, TypeError, AttributeError, KeyError, OverflowError,
                RecursionError) as exc:
            # an explicit tag on text it cannot convert (`!!int abc`), or aliases nested too deep
            raise RuleError(f"invalid YAML value for tag {node.tag}: {exc}",
                            self.location(node), code="yaml") from None

    def location(self, node: yaml.Node) -> Location:
        """Where a node starts, underlining its first line."""
        start, end = node.start_mark.index, node.end_mark.index
        return self._location_at(start, end)

    def expression_location(self, node: yaml.ScalarNode, start: int, end: int) -> Location:
        """Where offsets `start`..`end` of the scalar's value sit in the file."""
        positions = _align(self.text, node.start_mark.index, node.end_mark.index, node.value)
        if not positions:
            return self.location(node)
        first = positions[min(start, len(positions) - 1)] if start < len(positions) \
            else positions[-1] + 1
        last = positions[min(max(end - 1, start), len(positions) - 1)] if end > start else first
        return self._location_at(first, max(first + 1, last + 1))

    def _location_at(self, index: int, end: int | None = None) -> Location:
        line = bisect_right(self._line_starts, index) - 1
        column = index - self._line_starts[line]
        source_line = self.lines[line] if line < len(self.lines) else ""
        line_end = self._line_starts[line] + len(source_line)
        width = max(1, min(end if end is not None else index + 1, line_end) - index)
        return Location(self.path, line + 1, column + 1, source_line, width)


def quoting_hint(key: str) -> str:
    """How to write an expression YAML cannot hold as a plain scalar (`: `, ` #`, a leading
    quote, `*`, `[`...)."""
    return (f"quote the expression with single quotes or write it as a block scalar: "
            f"`{key}: |` and the expression on the next line")


def _indent(line: str) -> int:
    """A line's indentation; a blank or comment line has none that could hold a key."""
    return len(line) - len(line.lstrip(" ")) if line.strip() and \
        not line.lstrip().startswith("#") else 1 << 30


def _align(source: str, start: int, end: int, value: str) -> list[int]:
    """Source index of each character of a scalar's value: walk both texts, skipping quoting,
    indentation and line folding in the source."""
    positions: list[int] = []
    j = start
    for ch in value:
        k, limit = j, min(end, j + _MAX_ALIGN_SCAN)
        while k < limit and source[k] != ch and not (ch in " \n" and source[k] in " \n"):
            k += 1
        if k >= limit:
            positions.append(j)
            continue
        positions.append(k)
        j = k + 1
    return positions


def mapping_items(node: yaml.Node) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    """(key node, value node) pairs of a mapping node."""
    return list(node.value) if isinstance(node, yaml.MappingNode) else []


def is_string(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str"

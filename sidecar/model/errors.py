"""Errors BeTrace reports to people, with the source line and a caret under the problem.

    BetraceError                  anything we report without a traceback
     +-- ExpressionError          a rule expression is wrong (position is an offset in the text)
     +-- RuleError                a rule file is wrong (position is file:line:column)
     +-- RuleLoadError            one or more RuleErrors, collected so `check` can list them all
     +-- SourceError              a replay source or option that cannot be used (nothing was read)
     +-- StoreUnavailable         the trace store cannot serve now (e.g. Redis down): retry later
     +-- IncompatibleStore        the trace store holds state in a format this version cannot use

An ExpressionError knows only its expression; the rule loader turns it into a RuleError located
within the YAML file, so every message a user sees names file, line and column.
"""

from __future__ import annotations

from dataclasses import dataclass


class BetraceError(Exception):
    """Base of every error BeTrace reports without a traceback."""


class ExpressionError(BetraceError):
    """A rule expression that cannot be parsed or compiled; `start`/`end` are offsets in `text`."""

    def __init__(self, message: str, text: str, start: int, end: int | None = None,
                 code: str = "syntax") -> None:
        super().__init__(message)
        self.message = message
        self.text = text
        self.start = max(0, min(start, len(text)))
        self.end = max(self.start + 1, end if end is not None else self.start + 1)
        self.code = code

    def __str__(self) -> str:
        line, column = line_and_column(self.text, self.start)
        return render(f"<expression>:{line}:{column}", self.message, self.code,
                      self.text, self.start, self.end)


@dataclass(frozen=True)
class Location:
    """A place in a rule file: 1-based line and column, plus the span of text to underline."""

    file: str
    line: int
    column: int
    source_line: str = ""
    width: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}" if self.line else self.file


class RuleError(BetraceError):
    """One problem in one rule file."""

    def __init__(self, message: str, location: Location, code: str = "rule",
                 rule_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.location = location
        self.code = code
        self.rule_id = rule_id

    def __str__(self) -> str:
        loc = self.location
        text = f"{loc}: error[{self.code}]: {self.message}"
        if loc.source_line:
            text += "\n" + _snippet(loc.line, loc.source_line, loc.column, loc.width)
        return text

    def as_dict(self) -> dict[str, object]:
        loc = self.location
        return {"file": loc.file, "line": loc.line, "column": loc.column, "code": self.code,
                "rule_id": self.rule_id, "message": self.message}


class RuleLoadError(BetraceError):
    """Every error found while loading a rule set; a set with any error is not used."""

    def __init__(self, errors: list[RuleError]) -> None:
        super().__init__(f"{len(errors)} error(s) in rules")
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class SourceError(BetraceError):
    """A replay source that matches nothing, or an unusable replay option such as --since."""


class StoreUnavailable(BetraceError):
    """The trace store cannot serve right now (Redis down, failing over, out of memory): the
    sender should retry. Stores raise this and only this for such conditions; any other
    exception from a store is a bug, and is reported as one."""


class StoreBusy(StoreUnavailable):
    """The store is full and its decider behind (more traces pushed out by max_traces await
    their decision than max_traces again): refused whole, before anything is stored, so the
    sender slows down and retries instead of memory growing without bound."""


class IncompatibleStore(BetraceError):
    """The shared trace store holds state written in another format (another BeTrace version):
    mixing the two would misread traces, so the sidecar refuses to use it."""


def line_and_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of `offset` in `text`."""
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def render(where: str, message: str, code: str, text: str, start: int, end: int) -> str:
    line, column = line_and_column(text, start)
    lines = text.split("\n")
    source_line = lines[line - 1] if text.strip() and line <= len(lines) else ""
    head = f"{where}: error[{code}]: {message}"
    if not source_line:
        return head
    return head + "\n" + _snippet(line, source_line, column, end - start)


_SNIPPET_WIDTH = 120  # a longer source line is shown as a window around the caret


def _snippet(line: int, source_line: str, column: int, width: int) -> str:
    number = str(line)
    gutter = " " * len(number)
    width = max(1, min(width, len(source_line) - column + 1))
    if len(source_line) > _SNIPPET_WIDTH:
        start = max(0, min(column - 1 - _SNIPPET_WIDTH // 2, len(source_line) - _SNIPPET_WIDTH))
        tail = "..." if start + _SNIPPET_WIDTH < len(source_line) else ""
        source_line = ("..." if start else "") + source_line[start:start + _SNIPPET_WIDTH] + tail
        column = column - start + (3 if start else 0)
        width = min(width, _SNIPPET_WIDTH)
    return (f" {number} | {source_line}\n"
            f" {gutter} | {' ' * (column - 1)}{'^' * width}")

"""File-level `lists:` and `macros:` (DESIGN rule 20, as in Falco): the names rules may use.

A list name after `in` stands for its items. A macro name stands for its expression, parsed in
the context of its use (a condition term, a `.where` predicate, a span selector) and spliced into
the syntax tree, so every later pass sees only the expanded tree. A macro may use the lists and
the macros declared before it, which is what keeps macros from being recursive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sidecar.dsl.syntax import Literal

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Words the grammar reads as keywords: a list or macro so named could never be used.
KEYWORDS = frozenset({"and", "or", "not", "in", "matches", "contains", "before", "within",
                      "true", "false", "unique", "when", "always", "never"})
# Names a macro body mentions, outside quoted strings and comments (for naming a cycle only);
# a dotted name stops before `.where(`, as in the grammar.
_MENTION = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|'
                      r"([A-Za-z_][A-Za-z0-9_]*(?:\.(?!\s*where\s*\()[A-Za-z_][A-Za-z0-9_]*)*)")


@dataclass(frozen=True)
class Macro:
    name: str
    text: str
    origin: str  # where it is declared ("rules/a.yaml:4"), named by errors found at its uses
    index: int  # its place in declaration order: it may use only macros with a lower index


class Definitions:
    """The lists and macros of the rule files loaded together. Compared by identity: parses
    are cached per (text, definitions), and one load builds one Definitions."""

    def __init__(self, lists: Mapping[str, tuple[Literal, ...]] | None = None,
                 macros: Iterable[Macro] = ()) -> None:
        self.lists = dict(lists or {})
        self.macros = {macro.name: macro for macro in macros}

    def order_error(self, user: Macro, used: Macro) -> str:
        """Why the body of `user` may not use `used` (itself, or a macro declared after it)."""
        if used is user:
            return (f"macro '{user.name}' uses itself; a macro cannot be recursive (in quotes, "
                    f"\"{user.name}\" is the span or attribute of that name)")
        cycle = self._path(used, user)
        if cycle:
            return f"recursive macros: {' -> '.join([user.name, *cycle])}"
        return (f"macro '{user.name}' uses macro '{used.name}', declared after it at "
                f"{used.origin}; a macro may use only the macros declared before it")

    def _path(self, start: Macro, goal: Macro) -> list[str]:
        """Names from `start` to `goal` along the macros each body mentions ([] if none)."""
        paths, seen = [[start.name]], {start.name}
        while paths:
            path = paths.pop(0)
            if path[-1] == goal.name:
                return path
            for name in self._mentions(self.macros[path[-1]]):
                if name not in seen:
                    seen.add(name)
                    paths.append([*path, name])
        return []

    def _mentions(self, macro: Macro) -> list[str]:
        return [m.group(1) for m in _MENTION.finditer(macro.text)
                if m.group(1) in self.macros]


NO_DEFINITIONS = Definitions()


def name_error(name: str) -> str | None:
    """Why `name` cannot name a list or macro, or None when it can."""
    if not NAME.fullmatch(name):
        return (f"'{name}' is not a name: use letters, digits and '_' in dot-separated parts, "
                "such as payment.retried")
    if name in KEYWORDS:
        return f"'{name}' is a keyword of the rule language; choose another name"
    return None

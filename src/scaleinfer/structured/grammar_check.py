"""Grammars with no finite derivation, found before generation: a productive-rule check.

A rule is productive if one of its alternatives consists only of terminals (strings, character classes,
`""`) and productive rules; `x{0, n}` (xgrammar's form of `x*` / `x?`) is productive whatever `x` is.
The productive rules are a fixpoint: start from none, add every rule with such an alternative, repeat
until nothing changes. A grammar whose root is not productive has no finite output at all (e.g.
`root ::= "a" root`, or a JSON schema that requires a property of its own type with no way to stop): the
model would write until max_tokens. A rule reachable from the root that is not productive is a trap:
once the model enters it, it can never finish (e.g. `root ::= "x" | "a" b` with `b ::= "c" b`).

The check reads xgrammar's normalized text of the grammar it was handed (`str(compiled.grammar)`): the
same form for EBNF / GBNF, JSON schemas (converted to EBNF by xgrammar), regexes and choices. Anything in
that text this parser does not know (a TagDispatch, a Token(...), a Regex(...)) makes its rule count as
productive: the check only refuses what it can prove never finishes. Character classes count as
terminals even when they match nothing (`[^\\x00-\\U0010FFFF]`): the first-token check in compiler.py and
the mid-generation dead-end handling in bitmask.py deal with those.
"""
from __future__ import annotations

import re

_HEADER = re.compile(r"([A-Za-z_][\w.\-]*)(?:\[[^\]]*\])? ::= ")
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_REPEAT = re.compile(r"\{\s*(-?\d+)\s*,\s*(-?\d+)\s*\}")


class _Opaque(Exception):
    """A construct the parser does not know: its rule is taken as productive."""


def parse_rules(text: str) -> dict[str, tuple | None]:
    """xgrammar's grammar text -> {rule name: expression}; None for a rule the parser cannot read.

    Expressions: ("t",) a terminal, ("r", name) a rule, ("rep", name, min) a repetition,
    ("seq", [...]) a sequence, ("alt", [...]) alternatives."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            bodies[current] = [line[header.end():]]
        elif current is not None and line.strip():
            bodies[current].append(line)   # a construct printed over several lines (TagDispatch)
    rules = {}
    for name, lines in bodies.items():
        try:
            rules[name] = _Parser(" ".join(lines)).parse()
        except _Opaque:
            rules[name] = None
    return rules


class _Parser:
    """Recursive descent over one rule body: alternatives of sequences of atoms."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def parse(self) -> tuple:
        expr = self._alternatives()
        self._skip_space()
        if self.pos != len(self.text):
            raise _Opaque(self.text[self.pos:])
        return expr

    def _alternatives(self) -> tuple:
        options = [self._sequence()]
        while self._peek() == "|":
            self.pos += 1
            options.append(self._sequence())
        return options[0] if len(options) == 1 else ("alt", options)

    def _sequence(self) -> tuple:
        items = []
        while True:
            ch = self._peek()
            if ch in ("", "|", ")"):
                return items[0] if len(items) == 1 else ("seq", items)
            atom = self._atom()
            if atom is not None:
                items.append(atom)

    def _atom(self) -> tuple | None:
        ch = self.text[self.pos]
        if ch == '"':
            self._skip_quoted('"')
            return ("t",)
        if ch == "[":
            self._skip_quoted("]")
            if self.text.startswith("*", self.pos):
                self.pos += 1
            return ("t",)
        if ch == "(":
            lookahead = self.text.startswith("(=", self.pos)
            self.pos += 2 if lookahead else 1
            inner = self._alternatives()
            if self._peek() != ")":
                raise _Opaque("unclosed (")
            self.pos += 1
            return None if lookahead else inner   # a lookahead consumes nothing: no say in termination
        name = _NAME.match(self.text, self.pos)
        if name is None or self.text.startswith("(", name.end()):
            raise _Opaque(self.text[self.pos:])   # TagDispatch(...), Token(...), Regex(...), unknown syntax
        self.pos = name.end()
        repeat = _REPEAT.match(self.text, self.pos)
        if repeat:
            self.pos = repeat.end()
            return ("rep", name.group(), int(repeat.group(1)))
        return ("r", name.group())

    def _skip_quoted(self, close: str) -> None:
        i = self.pos + 1
        while i < len(self.text) and self.text[i] != close:
            i += 2 if self.text[i] == "\\" else 1
        if i >= len(self.text):
            raise _Opaque("unterminated " + close)
        self.pos = i + 1

    def _peek(self) -> str:
        self._skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1


def productive_rules(rules: dict[str, tuple | None]) -> set[str]:
    """The fixpoint: rules with an alternative of terminals and productive rules (unreadable ones count)."""
    productive = {name for name, expr in rules.items() if expr is None}
    changed = True
    while changed:
        changed = False
        for name, expr in rules.items():
            if name not in productive and _finishes(expr, productive, rules):
                productive.add(name)
                changed = True
    return productive


def _finishes(expr: tuple, productive: set[str], rules: dict) -> bool:
    kind = expr[0]
    if kind == "t":
        return True
    if kind == "r":
        return expr[1] in productive or expr[1] not in rules   # an unknown name: not ours to judge
    if kind == "rep":
        return expr[2] <= 0 or expr[1] in productive or expr[1] not in rules
    if kind == "seq":
        return all(_finishes(e, productive, rules) for e in expr[1])
    return any(_finishes(e, productive, rules) for e in expr[1])


def _references(expr: tuple | None):
    if expr is None or expr[0] == "t":
        return
    if expr[0] in ("r", "rep"):
        yield expr[1]
        return
    for e in expr[1]:
        yield from _references(e)


def unproductive_rules(text: str, root: str = "root") -> list[str]:
    """The rules reachable from `root` that can never finish (root first when it is one of them)."""
    rules = parse_rules(text)
    if root not in rules:
        return []
    productive = productive_rules(rules)
    seen, order, stack = {root}, [], [root]
    while stack:
        name = stack.pop()
        order.append(name)
        for ref in _references(rules.get(name)):
            if ref in rules and ref not in seen:
                seen.add(ref)
                stack.append(ref)
    return [name for name in order if name not in productive]

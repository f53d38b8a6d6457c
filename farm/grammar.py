"""Checking a GBNF grammar at submit time, without llama.cpp.

A client must not need llama.cpp, yet a grammar that does not parse must be refused before
it is queued. This is a syntax check of llama.cpp's GBNF (rules `name ::= ...`,
alternatives, sequences, string literals, character classes, `.`, groups, `* + ?` and
`{m,n}` repetition, `#` comments), plus the two semantic checks llama.cpp makes: a `root`
rule exists and every rule referred to is defined. The worker hands the grammar to
llama.cpp's own parser, which stays the authority.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_INT = re.compile(r"[0-9]+")
_ESCAPES = set('nrt\\"[]-^/')


class GrammarSyntaxError(ValueError):
    pass


def check_gbnf(text: str) -> None:
    """GrammarSyntaxError with the line and reason unless `text` is a usable GBNF grammar."""
    _Parser(text).parse()


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.defined: set[str] = set()
        self.used: dict[str, int] = {}

    def fail(self, why: str, at: int | None = None) -> GrammarSyntaxError:
        at = self.i if at is None else at
        line = self.s.count("\n", 0, at) + 1
        near = self.s[at : at + 20].split("\n")[0]
        return GrammarSyntaxError(f"line {line}: {why}" + (f" near {near!r}" if near else ""))

    def space(self, newlines: bool) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "#":
                while self.i < len(self.s) and self.s[self.i] not in "\r\n":
                    self.i += 1
            elif c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            else:
                return

    def parse(self) -> None:
        self.space(True)
        while self.i < len(self.s):
            m = _NAME.match(self.s, self.i)
            if not m:
                raise self.fail("expected a rule name")
            self.i = m.end()
            self.space(False)
            if not self.s.startswith("::=", self.i):
                raise self.fail("expected '::=' after the rule name")
            self.i += 3
            self.space(True)
            self.alternatives(nested=False)
            self.defined.add(m.group())
            self.space(True)
        if "root" not in self.defined:
            raise GrammarSyntaxError("the grammar has no 'root' rule")
        for name, at in self.used.items():
            if name not in self.defined:
                raise self.fail(f"rule '{name}' is used but never defined", at)

    def alternatives(self, nested: bool) -> None:
        self.sequence(nested)
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            self.space(True)
            self.sequence(nested)

    def sequence(self, nested: bool) -> None:
        items = 0
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == '"':
                self.literal('"')
            elif c == "[":
                self.char_class()
            elif c == ".":
                self.i += 1
            elif c == "(":
                self.i += 1
                self.space(True)
                self.alternatives(nested=True)
                if self.i >= len(self.s) or self.s[self.i] != ")":
                    raise self.fail("expected ')'")
                self.i += 1
            elif c in "*+?":
                if not items:
                    raise self.fail(f"'{c}' with nothing before it")
                self.i += 1
            elif c == "{":
                if not items:
                    raise self.fail("'{' with nothing before it")
                self.repetition()
            elif (m := _NAME.match(self.s, self.i)) is not None:
                rest = self.s[m.end() :].lstrip(" \t")
                if rest.startswith("::="):
                    if nested:
                        raise self.fail("a new rule starts inside a group; missing ')'")
                    return  # the next rule on the same line
                self.used.setdefault(m.group(), self.i)
                self.i = m.end()
            else:
                return
            items += 1
            self.space(nested)

    def literal(self, end: str) -> None:
        self.i += 1
        while self.i < len(self.s) and self.s[self.i] != end:
            self.char()
        if self.i >= len(self.s):
            raise self.fail(f"unterminated {'string' if end == chr(34) else 'character class'}")
        self.i += 1

    def char_class(self) -> None:
        if self.s.startswith("[^", self.i):
            self.i += 1
        self.literal("]")

    def char(self) -> None:
        if self.s[self.i] in "\r\n":
            raise self.fail("a line break inside a literal")
        if self.s[self.i] != "\\":
            self.i += 1
            return
        self.i += 1
        if self.i >= len(self.s):
            raise self.fail("a '\\' at the end")
        c = self.s[self.i]
        width = {"x": 2, "u": 4, "U": 8}.get(c)
        if width is not None:
            digits = self.s[self.i + 1 : self.i + 1 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"'\\{c}' needs {width} hex digits")
            self.i += 1 + width
        elif c in _ESCAPES:
            self.i += 1
        else:
            raise self.fail(f"unknown escape '\\{c}'")

    def repetition(self) -> None:
        self.i += 1
        self.space(False)
        low = _INT.match(self.s, self.i)
        if not low:
            raise self.fail("expected a number after '{'")
        self.i = low.end()
        self.space(False)
        if self.i < len(self.s) and self.s[self.i] == ",":
            self.i += 1
            self.space(False)
            high = _INT.match(self.s, self.i)
            if high:
                if int(high.group()) < int(low.group()):
                    raise self.fail("a repetition's maximum is below its minimum")
                self.i = high.end()
                self.space(False)
        if self.i >= len(self.s) or self.s[self.i] != "}":
            raise self.fail("expected '}'")
        self.i += 1


MAX_SCHEMA_DEPTH = 64


def check_json_schema(schema: object) -> None:
    """ValueError unless the worker's schema converter can take `schema`: nested at most
    MAX_SCHEMA_DEPTH levels (the converter recurses, and so do JSON encoders), and every
    `$ref` local (`#/...`) and pointing at a part of the schema. Walked without recursion,
    so a schema nested 50,000 deep is refused, not a RecursionError."""
    refs: list[str] = []
    todo: list[tuple[object, int]] = [(schema, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels: flatten it")
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                if not isinstance(ref, str):
                    raise ValueError("a '$ref' must be a string such as '#/$defs/name'")
                refs.append(ref)
            todo.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)
    for ref in refs:
        _resolve(schema, ref)


def _resolve(schema: object, ref: str) -> None:
    """ValueError unless `ref` is a JSON pointer into `schema` (one starting with '#/')."""
    shown = ref if len(ref) <= 60 else ref[:60] + "..."
    if not ref.startswith("#/"):
        raise ValueError(
            f"'$ref' {shown!r} is not local: only references into the schema itself "
            "('#/$defs/name') are taken; put the referred schema under '$defs'"
        )
    target = schema
    for key in ref[2:].split("/"):  # as the converter reads it: object keys, unescaped
        if not isinstance(target, dict) or key not in target:
            raise ValueError(
                f"'$ref' {shown!r} points at nothing in the schema ({key!r} is missing)"
            )
        target = target[key]

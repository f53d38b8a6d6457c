"""JSON schemas to GBNF: llama-cpp-python's converter, with integer bounds enforced.

llama-cpp-python's SchemaConverter turns `{"type": "integer", "minimum": 0, "maximum": 99}`
into any integer (its TODO); a model then writes `"count": 4475204483380000` and the reply
breaks its schema. Here an integer with `minimum`, `maximum`, `exclusiveMinimum` or
`exclusiveMaximum` becomes a grammar of exactly the integers in range (as llama.cpp's own
converter builds them): the range is split into runs that share a prefix and then take any
digit, e.g. 7..123 -> [7-9] | [1-9] [0-9] | "1" [0-1] [0-9] | "12" [0-3].
"""

from __future__ import annotations

import json
import math
from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

MAX_DIGITS = 16  # digits of an integer without an upper bound (JSON numbers past 2^53 lose)
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Keys that decide an integer's values before its bounds do (the parent converter's).
_FIRST = ("$ref", "oneOf", "anyOf", "allOf", "const", "enum")


def json_schema_to_gbnf(schema: str) -> str:
    """The GBNF grammar of `schema` (a JSON string); llama-cpp-python's, with integer bounds."""
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(json.loads(schema), "stdin"), "")
    return str(converter.format_grammar())


class _Converter(SchemaConverter):
    def visit(self, schema: Any, name: str) -> Any:
        bounded = isinstance(schema, dict) and any(k in schema for k in BOUNDS)
        if bounded and schema.get("type") == "integer" and not any(k in schema for k in _FIRST):
            low, high = integer_bounds(schema)
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, f"({integer_range(low, high)}) space")
        return super().visit(schema, name)


def integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The smallest and largest integers `schema` allows (None: unbounded, as is a bound of
    MAX_DIGITS digits or more); ValueError for bounds that are not numbers or leave no
    integer. Draft 4's boolean exclusiveMinimum/exclusiveMaximum make minimum/maximum
    exclusive."""
    low: int | None = None
    high: int | None = None
    schema = dict(schema)
    for key, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(schema.get(key), bool):  # draft 4: a flag on the plain bound
            flag = schema.pop(key)
            if flag and plain in schema:
                schema[key] = schema.pop(plain)
    for key in BOUNDS:
        v = schema.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"'{key}' must be a number, not {v!r}")
        if key == "minimum":
            low = max(low, math.ceil(v)) if low is not None else math.ceil(v)
        elif key == "exclusiveMinimum":
            low = max(low, math.floor(v) + 1) if low is not None else math.floor(v) + 1
        elif key == "maximum":
            high = min(high, math.floor(v)) if high is not None else math.floor(v)
        else:
            high = min(high, math.ceil(v) - 1) if high is not None else math.ceil(v) - 1
    if low is not None and high is not None and low > high:
        raise ValueError(f"no integer lies between the bounds ({low} > {high})")
    huge = 10**MAX_DIGITS
    return (None if low is not None and low <= -huge else low), (
        None if high is not None and high >= huge else high
    )


def integer_range(low: int | None, high: int | None) -> str:
    """GBNF alternatives for exactly the integers in [low, high] (None: unbounded)."""
    parts: list[str] = []
    if low is None or low < 0:  # the negative ones: "-" and a magnitude
        most = None if low is None else -low
        least = 1 if high is None or high >= 0 else -high
        parts += [f'"-" {p}' for p in _naturals(least, most)]
    if high is None or high >= 0:
        parts += _naturals(max(low or 0, 0), high)
    return " | ".join(parts)


def _naturals(low: int, high: int | None) -> list[str]:
    """Alternatives for the integers low..high >= 0 written without leading zeros."""
    if high is None:
        digits = len(str(low))
        more = f"[1-9] [0-9]{{{digits},{MAX_DIGITS - 1}}}" if digits < MAX_DIGITS else None
        return _between(low, 10**digits - 1) + ([more] if more else [])
    if low > high:
        return []
    return _between(low, high)


def _between(low: int, high: int) -> list[str]:
    """low..high (0 <= low <= high): split where the digit count changes, then by prefix."""
    lo, hi = str(low), str(high)
    if len(lo) < len(hi):
        return _between(low, 10 ** len(lo) - 1) + _between(10 ** len(lo), high)
    if low == high:
        return [f'"{lo}"']
    i = next(k for k in range(len(lo)) if lo[k] != hi[k])
    prefix, rest = lo[:i], len(lo) - i - 1
    parts: list[str] = []
    first, last = int(lo[i]), int(hi[i])
    if lo[i + 1 :] != "0" * rest:  # low's run up to prefix + lo[i] + 99...
        parts += _between(low, int(prefix + lo[i] + "9" * rest))
        first += 1
    tail: list[str] = []
    if hi[i + 1 :] != "9" * rest:  # high's run from prefix + hi[i] + 00...
        tail = _between(int(prefix + hi[i] + "0" * rest), high)
        last -= 1
    if first <= last:
        digit = str(first) if first == last else f"[{first}-{last}]"
        items = [f'"{prefix}"'] if prefix else []
        items += [f'"{digit}"' if first == last else digit] + ["[0-9]"] * rest
        parts.append(" ".join(items))
    return parts + tail

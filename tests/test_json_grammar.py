"""JSON schema integer bounds become grammars of exactly the integers in range."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llama_cpp")

from workers.json_grammar import integer_bounds, integer_range, json_schema_to_gbnf


def as_regex(alternatives: str) -> re.Pattern[str]:
    """The alternatives as a Python regex: literals, character classes, {m,n} repeats."""
    out = []
    for alt in alternatives.split(" | "):
        parts = []
        for item in alt.split(" "):
            if item.startswith('"'):
                parts.append(re.escape(item.strip('"')))
            else:
                m = re.fullmatch(r"(\[[^\]]*\])(\{\d+,\d+\})?", item)
                assert m, item
                parts.append(item)
        out.append("".join(parts))
    return re.compile("(?:" + "|".join(out) + ")")


@pytest.mark.parametrize(
    ("low", "high"),
    [(0, 99), (7, 123), (-50, 50), (-123, -7), (1, 1), (0, 0), (-1, 0), (999, 1000),
     (10, 10000), (None, 5), (5, None), (None, -3), (-3, None), (123456, 123999)],
)  # fmt: skip
def test_exactly_the_integers_in_range_and_no_leading_zeros(low, high):
    rx = as_regex(integer_range(low, high))
    for v in range(-1500, 130000):
        inside = (low is None or v >= low) and (high is None or v <= high)
        assert bool(rx.fullmatch(str(v))) == inside, (low, high, v)
    for text in ("00", "01", "-0", "007", "-01", "+1"):
        assert not rx.fullmatch(text)


def test_bounds_from_the_schema_keywords():
    assert integer_bounds({"minimum": 0, "maximum": 99}) == (0, 99)
    assert integer_bounds({"exclusiveMinimum": 0, "exclusiveMaximum": 10}) == (1, 9)
    assert integer_bounds({"minimum": 1.5, "maximum": 7.5}) == (2, 7)
    assert integer_bounds({"minimum": 3, "exclusiveMinimum": 5}) == (6, None)
    assert integer_bounds({"minimum": 0, "exclusiveMinimum": True}) == (1, None)  # draft 4
    assert integer_bounds({"maximum": 9, "exclusiveMaximum": False}) == (None, 9)
    assert integer_bounds({"minimum": 0, "maximum": 1e300}) == (0, None)  # past 16 digits
    with pytest.raises(ValueError, match="no integer"):
        integer_bounds({"minimum": 5, "maximum": 4})
    with pytest.raises(ValueError, match="must be a number"):
        integer_bounds({"minimum": "1"})


def test_llama_cpp_parses_the_grammar_of_a_bounded_schema():
    from llama_cpp import LlamaGrammar

    schema = {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
            "year": {"type": "integer", "minimum": 1900},
            "delta": {"type": "integer", "exclusiveMaximum": 0},
        },
        "required": ["count", "year", "delta"],
    }
    gbnf = json_schema_to_gbnf(json.dumps(schema))
    assert "[1-9] [0-9]" in gbnf and "[0-9]{4,15}" in gbnf
    LlamaGrammar.from_string(gbnf, verbose=False)  # raises when llama.cpp cannot parse it


def test_an_enum_or_const_decides_before_the_bounds():
    enum = json_schema_to_gbnf(json.dumps({"type": "integer", "minimum": 1, "enum": [1, 5, 10]}))
    assert '"10"' in enum and "[0-9]" not in enum
    const = json_schema_to_gbnf(json.dumps({"type": "integer", "maximum": 9, "const": 7}))
    assert '"7"' in const and "[0-9]" not in const

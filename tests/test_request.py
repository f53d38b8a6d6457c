"""The request type: both forms accepted, every bad field named, nothing else let through."""

import json
import os
import re

import pytest

from farm.errors import InvalidRequest
from farm.request import Request, make_request
from tests.conftest import run_cli


def test_flat_and_nested_forms_build_the_same_request():
    flat = make_request({"model": "m", "prompt": "hi", "temperature": 0.2, "max_tokens": 9})
    nested = make_request(
        {
            "model": "m",
            "prompt": "hi",
            "sampling": {"temperature": 0.2},
            "stopping": {"max_tokens": 9},
        }
    )
    assert flat == nested
    assert flat.sampling.temperature == 0.2
    assert flat.stopping.max_tokens == 9


def test_every_sampling_and_stopping_field_is_accepted():
    req = make_request(
        {
            "model": "m",
            "prompt": "hi",
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 20,
            "min_p": 0.1,
            "typical_p": 0.95,
            "repeat_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "penalty_last_n": 32,
            "mirostat_mode": 2,
            "mirostat_tau": 4.0,
            "mirostat_eta": 0.2,
            "seed": 7,
            "stop": ["\n\n"],
            "max_tokens": 5,
            "max_time_ms": 1000,
            "priority": "high",
            "session": "alice",
        }
    )
    wire = req.to_wire()
    assert wire["sampling"]["mirostat_mode"] == 2
    assert wire["stopping"] == {"stop": ["\n\n"], "max_tokens": 5, "max_time_ms": 1000}
    assert wire["priority"] == "high" and wire["session"] == "alice"


def test_routing_fields_are_kept_apart_from_sampling():
    wire = make_request({"model": "m", "prompt": "hi", "priority": "low"}).to_wire()
    assert "priority" not in wire["sampling"] and "session" not in wire["sampling"]


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("temperature", 7, "sampling.temperature"),
        ("top_p", 0, "sampling.top_p"),
        ("top_k", -1, "sampling.top_k"),
        ("mirostat_mode", 3, "sampling.mirostat_mode"),
        ("seed", -5, "sampling.seed"),
        ("max_tokens", -1, "stopping.max_tokens"),
        ("max_tokens", 10**6, "stopping.max_tokens"),
        ("stop", [""], "stopping.stop"),
        ("priority", "urgent", "priority"),
        ("session", "", "session"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field, value, named):
    with pytest.raises(InvalidRequest, match=f"'{named}'"):
        make_request({"model": "m", "prompt": "hi", field: value})


def test_unknown_fields_are_refused_by_name():
    with pytest.raises(InvalidRequest, match="unknown field 'temprature'"):
        make_request({"model": "m", "prompt": "hi", "temprature": 0.5})
    with pytest.raises(InvalidRequest, match="unknown field 'sampling.nucleus'"):
        make_request({"model": "m", "prompt": "hi", "sampling": {"nucleus": 0.5}})


def test_a_field_given_flat_and_nested_is_refused():
    with pytest.raises(InvalidRequest, match="temperature given both flat and inside 'sampling'"):
        make_request(
            {"model": "m", "prompt": "hi", "temperature": 1, "sampling": {"temperature": 1}}
        )


def test_exactly_one_of_prompt_and_messages():
    with pytest.raises(InvalidRequest, match="exactly one of 'prompt' or 'messages'"):
        make_request({"model": "m"})
    with pytest.raises(InvalidRequest, match="exactly one"):
        make_request({"model": "m", "prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    chat = make_request({"model": "m", "messages": [{"role": "user", "content": "b"}]})
    assert chat.is_chat


def test_model_names_that_would_break_queue_names_are_refused():
    for bad in ("Model", "a:b", "a b", "", "-x"):
        with pytest.raises(InvalidRequest, match="'model'"):
            make_request({"model": bad, "prompt": "hi"})


def test_error_messages_do_not_echo_whole_prompts():
    secret = "x" * 500
    with pytest.raises(InvalidRequest) as info:
        make_request({"model": "m", "prompt": secret, "temperature": 99})
    assert secret not in str(info.value)


# -- output constraints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= "yes" | "no"',
        'root ::= item ("," item)*\nitem ::= [a-z]+ # a word\n',
        'root ::= ( "a" | [^\\n\\x41] )? "b"{1,3} . "\\u00e9"',
        'root ::= x\nx ::= "a"{2,} [0-9]{0,2}',
    ],
)
def test_gbnf_grammars_llama_cpp_accepts_pass_the_submit_check(grammar):
    assert make_request({"model": "m", "prompt": "p", "grammar": grammar}).grammar == grammar


@pytest.mark.parametrize(
    ("grammar", "reason"),
    [
        ('item ::= "a"', "no 'root' rule"),
        ('root ::= "a" other', "rule 'other' is used but never defined"),
        ('root ::= ("a"', "expected ')'"),
        ('root ::= "abc', "unterminated string"),
        ("root ::= [a-", "unterminated character class"),
        ('root "a"', "expected '::='"),
        ('root ::= "a"{3,1}', "maximum is below its minimum"),
        ('root ::= "\\q"', "unknown escape"),
    ],
)
def test_a_grammar_that_does_not_parse_is_refused_naming_the_field_and_the_line(grammar, reason):
    with pytest.raises(InvalidRequest, match=f"invalid 'grammar': .*{re.escape(reason)}"):
        make_request({"model": "m", "prompt": "p", "grammar": grammar})


def test_response_format_takes_openais_shapes_and_travels_under_its_own_names():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = make_request(
        {
            "model": "m",
            "prompt": "p",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema},
            },
        }
    )
    assert r.to_wire()["response_format"]["json_schema"]["schema"] == schema
    assert Request.model_validate(r.to_wire()) == r
    assert make_request({"model": "m", "prompt": "p", "response_format": {"type": "json_object"}})


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "xml"},
        {"type": "json_object", "json_schema": {"schema": {}}},
    ],
)
def test_a_malformed_response_format_is_refused(fmt):
    with pytest.raises(InvalidRequest, match="'response_format"):
        make_request({"model": "m", "prompt": "p", "response_format": fmt})


def test_grammar_and_a_json_response_format_together_are_refused():
    with pytest.raises(InvalidRequest, match="not both"):
        make_request(
            {
                "model": "m",
                "prompt": "p",
                "grammar": 'root ::= "a"',
                "response_format": {"type": "json_object"},
            }
        )


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def with_schema(schema: dict) -> dict:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return {"model": "m", "prompt": "p", "response_format": fmt}


DEFS = {"$defs": {"item": {"type": "integer"}}, "type": "array"}


@pytest.mark.parametrize(
    "schema",
    [
        {**DEFS, "items": {"$ref": "#/$defs/item"}},
        {
            "definitions": {"a": {"properties": {"b": {"type": "string"}}}},
            "items": {"$ref": "#/definitions/a/properties/b"},
        },
        nested(60),
    ],
)
def test_json_schemas_the_workers_converter_takes_pass_the_submit_check(schema):
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    make_request(with_schema(schema))
    assert llama_grammar.json_schema_to_gbnf(json.dumps(schema))  # the worker's converter


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({**DEFS, "items": {"$ref": "#/$defs/missing"}}, "points at nothing"),
        ({"type": "array", "items": {"$ref": "#/$defs/item"}}, "points at nothing"),
        ({"items": {"$ref": "https://example.com/s.json"}}, "is not local"),
        ({"items": {"$ref": 7}}, "must be a string"),
        ({"d": [{"type": "string"}], "items": {"$ref": "#/d/0"}}, "points at nothing"),
    ],
)
def test_a_json_schema_whose_ref_the_worker_cannot_resolve_is_refused_at_submit(schema, reason):
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    with pytest.raises(InvalidRequest, match=f"'response_format.*{reason}"):
        make_request(with_schema(schema))
    with pytest.raises(Exception):  # noqa: B017 - the converter raises bare Exceptions
        llama_grammar.json_schema_to_gbnf(json.dumps(schema))


def test_a_schema_nested_50000_deep_is_refused_without_a_recursion_error():
    with pytest.raises(InvalidRequest, match="nests deeper than 64 levels"):
        make_request(with_schema(nested(50_000)))


def test_farm_submit_with_a_50000_deep_json_schema_says_so_without_a_traceback(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"items":' * 50_000 + "{}" + "}" * 50_000)
    env = {**os.environ, "FARM_HOME": str(tmp_path)}
    r = run_cli(env, "submit", "hi", "--json-schema", str(path))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--json-schema" in r.stderr and "nests too deep" in r.stderr

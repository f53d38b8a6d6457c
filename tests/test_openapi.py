"""The gateway's /openapi.json against what its routes do: every body a route reads is
documented with the fields it requires, every refusal in OpenAI's error shape, and a body
valid by the document gets past the route's own (hand-written) checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from farm.config import reset_settings
from farm.context import reset_context
from farm.gateway.app import create_app
from farm.openai.shapes import ChatBody
from farm.request import Sampling, Stopping

# POST routes: the body's media type and the fields it must hold.
BODIES = {
    "/v1/chat/completions": ("application/json", {"model", "messages"}),
    "/v1/completions": ("application/json", {"model", "prompt"}),
    "/v1/embeddings": ("application/json", {"model", "input"}),
    "/v1/responses": ("application/json", {"model", "input"}),
    "/v1/batches": ("application/json", {"input_file_id", "endpoint"}),
    "/v1/files": ("multipart/form-data", {"file", "purpose"}),
}
NO_BODY = {"/v1/batches/{batch_id}/cancel"}
ERROR_REF = "#/components/schemas/ErrorBody"
TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "today's weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# Bodies the other tests send and the gateway takes (tests/test_gateway.py, test_tools.py,
# test_responses.py, test_embeddings.py, test_batches.py).
ACCEPTED = {
    "/v1/chat/completions": [
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 2,
            "n": 2,
            "stop": "\n",
            "seed": 7,
            "temperature": 0,
            "logit_bias": {"15": -100},
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": "object"}},
            },
        },
    ],
    "/v1/completions": [
        {"model": "m", "prompt": "Once", "max_tokens": 4, "stop": ["."], "top_k": 40},
        {"model": "m", "prompt": ["a", "b"], "n": 2, "echo": True, "logprobs": 2, "best_of": 2},
    ],
    "/v1/embeddings": [
        {"model": "m", "input": "hello"},
        {"model": "m", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 64},
        {"model": "m", "input": [1, 2, 3]},
        {"model": "m", "input": [[1, 2], [3]]},
    ],
    "/v1/responses": [
        {"model": "m", "input": "hi", "instructions": "be brief", "store": False},
        {
            "model": "m",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "tool_choice": "auto",
            "text": {"format": {"type": "json_object"}},
            "max_output_tokens": 16,
            "previous_response_id": "resp_1",
            "stream": True,
        },
    ],
    "/v1/batches": [
        {"input_file_id": "file-1", "endpoint": "/v1/completions"},
        {
            "input_file_id": "file-1",
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "metadata": {"k": "v"},
        },
    ],
}


@pytest.fixture
def gateway(
    migrated_db: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The gateway on an empty, migrated registry and the test Redis: no model is known."""
    monkeypatch.setenv("FARM_DATABASE_URL", migrated_db)
    monkeypatch.setenv("FARM_BROKER_URL", redis_url)
    monkeypatch.delenv("FARM_GATEWAY_REQUIRE_KEYS", raising=False)
    reset_settings()
    reset_context()
    yield TestClient(create_app())
    monkeypatch.undo()
    reset_settings()
    reset_context()


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return TestClient(create_app()).get("/openapi.json").json()


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Validator:
    """A validator for `schema`, whose $refs point into the document `spec`."""
    registry = Registry().with_resource("urn:openapi", DRAFT202012.create_resource(spec))
    ref = schema.get("$ref", "")
    return jsonschema.Draft202012Validator(
        {"$ref": f"urn:openapi{ref}"} if ref else schema, registry=registry
    )


def resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = spec["components"]["schemas"][name]
    return schema


def body_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    media, _ = BODIES[path]
    return spec["paths"][path]["post"]["requestBody"]["content"][media]["schema"]


def minimal(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    """The smallest value `schema` allows: its required fields only, each at its least."""
    schema = resolved(spec, schema)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return minimal(spec, schema["anyOf"][0])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: minimal(spec, properties[name]) for name in schema.get("required", [])}
    if kind == "array":
        return [minimal(spec, schema["items"]) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return "x" * max(1, schema.get("minLength", 0))
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    assert kind == "boolean", schema
    return False


def test_every_post_route_documents_the_body_it_reads_and_the_fields_it_requires(spec):
    posts = {path for path, ops in spec["paths"].items() if "post" in ops}
    assert posts == set(BODIES) | NO_BODY
    for path, (media, required) in BODIES.items():
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True and set(body["content"]) == {media}, path
        assert set(resolved(spec, body_schema(spec, path))["required"]) == required, path
    for path in NO_BODY:
        assert "requestBody" not in spec["paths"][path]["post"]


def test_every_route_documents_its_refusals_in_openais_error_shape(spec, gateway):
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            where = f"{method.upper()} {path}"
            assert "422" not in responses, where  # the gateway answers those 400
            refusals = {s: r for s, r in responses.items() if s.startswith("4") or s == "default"}
            refs = {s: r["content"]["application/json"]["schema"] for s, r in refusals.items()}
            assert all(ref == {"$ref": ERROR_REF} for ref in refs.values()), where
            assert "default" in refs, where
            if path != "/health":  # it answers even a refused key: it has no 4xx
                assert any(s.startswith("4") for s in refs), where
            assert all("x-request-id" in r["headers"] for r in responses.values()), where
    error = validator(spec, {"$ref": ERROR_REF})
    error.validate(gateway.get("/v1/nowhere").json())  # no route: 404, the same shape
    for method, url, route, status in [
        ("get", "/v1/models/no-such-model", "/v1/models/{model_id}", 404),
        ("post", "/v1/completions", "/v1/completions", 400),
    ]:
        r = gateway.request(method, url, json={"model": "m", "prompt": 7})
        assert r.status_code == status, r.text
        assert str(status) in spec["paths"][route][method]["responses"]
        error.validate(r.json())


def test_the_documented_bodies_take_what_clients_send_and_refuse_a_body_without_model(spec):
    for path, bodies in ACCEPTED.items():
        check = validator(spec, body_schema(spec, path))
        for body in bodies:
            check.validate(body)
        first = "model" if "model" in BODIES[path][1] else "input_file_id"
        missing = {k: v for k, v in bodies[0].items() if k != first}
        assert not check.is_valid(missing), path
        assert not check.is_valid({**bodies[0], "no_such_parameter": 1}), path


def test_a_minimal_body_valid_by_the_document_gets_past_the_routes_own_checks(spec, gateway):
    for path, (media, required) in BODIES.items():
        schema = body_schema(spec, path)
        body = minimal(spec, schema)
        assert set(body) == required
        if "model" in body:
            body["model"] = "no-such-model"  # nothing is queued
        validator(spec, schema).validate(body)
        if media == "multipart/form-data":
            r = gateway.post(path, files={"file": ("in.jsonl", body.pop("file"))}, data=body)
            assert r.status_code == 200, r.text
            continue
        r = gateway.post(path, json=body)
        error = r.json()["error"]
        assert r.status_code == 404, (path, r.text)  # not a 400: the body's shape was right
        if "model" in body:
            assert error["param"] == "model" and error["code"] == "model_not_found", error
        else:
            assert "no file 'x'" in error["message"], error
        # A body the document refuses for a missing field, the route refuses naming it.
        for name in required:
            refused = gateway.post(path, json={k: v for k, v in body.items() if k != name})
            assert refused.status_code == 400, (path, name, refused.text)
            assert refused.json()["error"]["param"] == name, (path, refused.text)


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "maxItems",
          "maxProperties", "enum")  # fmt: skip


def bounds(schema: dict[str, Any]) -> dict[str, Any]:
    found = {k: schema[k] for k in BOUNDS if k in schema}
    for branch in schema.get("anyOf", []):
        found.update(bounds(branch))
    return found


def test_the_documented_sampling_bounds_are_the_ones_farms_request_enforces():
    documented = ChatBody.model_json_schema()["properties"]
    for model in (Sampling, Stopping):
        own = model.model_json_schema()["properties"]
        shared = set(own) & set(documented)
        assert shared, model
        for name in shared:
            assert bounds(documented[name]) == bounds(own[name]), name

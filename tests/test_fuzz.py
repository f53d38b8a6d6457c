"""Whatever reaches `farm.submit` becomes a validated request or an InvalidRequest naming
the field: never another exception, and never something the registry or the worker would
refuse later (NUL bytes, lone surrogates, absurd timestamps, non-object groups)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from farm.enqueue import build, check_seconds
from farm.errors import InvalidRequest
from farm.request import Request
from tests.conftest import MODEL

FIELDS = [
    "model", "prompt", "messages", "sampling", "stopping", "priority", "session", "grammar",
    "response_format", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed",
    "penalty_last_n", "mirostat_mode", "submitted_at", "stream_tokens", "", "bogus",
]  # fmt: skip

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["\x00", "\ud800", "a\udcffb", "high", "gemma3-270m", 'root ::= "a"']),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=junk, fields=st.dictionaries(st.sampled_from(FIELDS), junk, max_size=5))
def test_any_input_is_a_valid_request_or_an_invalid_request_error(prompt, fields):
    fields.setdefault("model", "gemma3-270m")
    fields.pop("prompt", None)  # farm.submit's first argument, never a keyword as well
    try:
        request = build(prompt if isinstance(prompt, str) else None, **fields)
    except InvalidRequest as e:
        assert str(e) and len(str(e)) < 4000  # says what was wrong, without echoing it all
        return
    wire = request.to_wire()
    encoded = json.dumps(wire).encode("utf-8")  # what crosses the wire encodes
    assert b"\\u0000" not in encoded
    assert Request.model_validate(json.loads(encoded)) == request


@given(value=junk)
def test_wait_and_timeout_seconds_are_numbers_or_refused(value):
    try:
        check_seconds("wait_for_worker", value)
    except InvalidRequest as e:
        assert "invalid 'wait_for_worker'" in str(e)
    else:
        assert isinstance(value, int | float) and 0 <= value <= 86400


# -- the gateway ---------------------------------------------------------------------------
OPENAI_NAMES = [
    "model", "messages", "prompt", "stream", "stream_options", "n", "max_tokens",
    "max_completion_tokens", "temperature", "top_p", "stop", "seed", "response_format",
    "logprobs", "user", "metadata", "store", "top_k", "grammar", "bogus",
]  # fmt: skip
part = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["text", "text", "image_url", 3]),
        "text": st.text(max_size=5) | st.integers() | st.none() | st.lists(st.text(max_size=2)),
    }
)
content = st.lists(part, min_size=1, max_size=2) | st.text(max_size=8) | junk
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "tool", 1]), "content": content}
)
# Values aimed at OpenAI's types (a string for a boolean, a boolean for an integer...).
TYPED = {
    "stream": st.sampled_from([True, False, "false", "true", 1, 0, None]),
    "stream_options": st.sampled_from(["yes", 1, True, [], None])
    | st.dictionaries(
        st.sampled_from(["include_usage", "bogus"]), st.sampled_from([True, "yes", 1]), max_size=2
    ),
    "n": st.sampled_from([1, 2, 0, True, "1", 1.0, None]),
    "max_tokens": st.sampled_from([1, 2, "2", True, 2.0, -1, 0, None]),
    "max_completion_tokens": st.sampled_from([1, "1", False, 10**30]),
    "temperature": st.sampled_from([0, 0.5, "0.5", True, -1, 9, None]),
    "seed": st.sampled_from([1, "1", 1.5, -1, 2**40]),
    "stop": st.sampled_from(["x", ["a", 1], [], [""], 5, ["\x00"]]),
    "logprobs": st.sampled_from([True, False, 1, 0, "yes"]),
    "user": st.sampled_from(["u", 1, "\x00"]),
    "response_format": st.sampled_from(
        [
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/x"}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}},
            "json",
            {"type": 1},
        ]
    ),
    "bogus": junk,
}
overrides = st.dictionaries(st.sampled_from(OPENAI_NAMES), junk, max_size=2)


def usage_rows(database_url: str) -> int:
    from sqlalchemy import func, select

    from farm.registry import transaction
    from farm.registry.tables import UsageRecord

    with transaction(database_url) as s:
        return int(s.scalar(select(func.count()).select_from(UsageRecord)) or 0)


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.e2e
@example(
    chat=True,
    typed={"stream": True, "stream_options": "yes"},
    messages=None,
    changes=None,
    whole=None,
)
@example(
    chat=True,
    typed={},
    messages=[{"role": "user", "content": [{"type": "text", "text": 7}]}],
    changes=None,
    whole=None,
)
@example(
    chat=True,
    typed={},
    messages=[{"role": "user", "content": [{"type": "image_url"}]}],
    changes=None,
    whole=None,
)
@example(
    chat=False,
    typed={"n": True, "stream": "false", "max_tokens": "2"},
    messages=None,
    changes=None,
    whole=None,
)
@example(
    chat=True,
    typed={
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/x"}}}
    },
    messages=HI,
    changes=None,
    whole=None,
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chat=st.booleans(),
    typed=st.fixed_dictionaries({}, optional=TYPED),
    messages=st.lists(message, min_size=1, max_size=2) | st.none() | junk,
    changes=st.none() | overrides,
    whole=st.none() | junk,
)
def test_no_body_gets_a_5xx_from_the_gateway_and_a_refused_one_queues_nothing(
    live_farm, chat, typed, messages, changes, whole
):
    from fastapi.testclient import TestClient

    from farm.gateway.app import create_app

    live_farm.activate()
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    if chat and messages is not None:
        base["messages"] = messages
    body: Any = {**base, **typed, **(changes or {})} if whole is None else whole
    if isinstance(body, dict):  # whatever is accepted runs: keep it short
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 2:
                body[name] = 2
    route = "/v1/chat/completions" if chat else "/v1/completions"
    before = usage_rows(live_farm.database_url)
    with TestClient(create_app()) as gateway:
        r = gateway.post(route, content=json.dumps(body).encode())
    event(f"status {r.status_code}")  # --hypothesis-show-statistics: how many got through
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and "param" in error
        assert usage_rows(live_farm.database_url) == before, (body, r.text)

"""OpenAI's Responses API with the official `openai` package, against a real `farm serve`
in front of the live farm's worker (Gemma 3 270M)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
from sqlalchemy import delete

from farm.registry import transaction
from farm.registry.tables import ApiKeyRecord
from tests.conftest import MODEL
from tests.test_gateway import client, gateway, usage_rows

__all__ = ["gateway"]  # the module's `farm serve`, shared with tests/test_gateway.py's way

pytestmark = pytest.mark.e2e

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_a_plain_create_returns_text_and_usage(gateway):
    r = client(gateway).responses.create(
        model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0
    )
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage and r.usage.input_tokens > 3 and 0 < r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details and r.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_carries_the_first_turn_and_finds_it_cached(gateway):
    c = client(gateway)
    first = c.responses.create(
        model=MODEL,
        instructions="Answer briefly.",
        input="My name is Ada. Remember it.",
        max_output_tokens=8,
        temperature=0,
    )
    second = c.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        instructions="Answer briefly.",  # not carried over (OpenAI's rule): sent again
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]}],
        max_output_tokens=8,
        temperature=0,
    )
    assert first.usage and second.usage
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 2
    # The first turn's prompt is the second's prefix, still in the slot's cache.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 2
    assert second.previous_response_id == first.id


def test_the_sdk_stream_helper_reads_farms_event_stream(gateway):
    c = client(gateway)
    deltas, kinds, numbers, final = [], [], [], None
    with c.responses.stream(
        model=MODEL, input="Count to five.", max_output_tokens=12, temperature=0
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert numbers == list(range(len(numbers)))
    assert deltas and final is not None and final.output_text == "".join(deltas)
    assert final.usage and final.usage.output_tokens > 0
    stored = c.responses.retrieve(final.id)
    assert stored.output_text == final.output_text

    raw = [
        e.type
        for e in c.responses.create(model=MODEL, input="Hi", max_output_tokens=3, stream=True)
    ]
    assert raw[0] == "response.created" and raw[-1] in ("response.completed", "response.incomplete")


def test_a_required_function_call_validates_and_its_output_gets_an_answer(gateway):
    c = client(gateway)
    r = c.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=40,
        temperature=0,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])  # type: ignore[arg-type]
    answer = c.responses.create(
        model=MODEL,
        previous_response_id=r.id,
        input=[
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=8,
        temperature=0,
    )
    assert answer.output and answer.usage and answer.usage.input_tokens > r.usage.input_tokens  # type: ignore[union-attr]

    deltas, done = [], []
    with c.responses.stream(
        model=MODEL,
        input="Weather in Rome?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=40,
        temperature=0,
    ) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
            if event.type == "response.function_call_arguments.done":
                done.append(event.arguments)
    assert done and "".join(deltas) == done[0]
    jsonschema.validate(json.loads(done[0]), WEATHER["parameters"])  # type: ignore[arg-type]


def test_a_stored_response_is_its_sessions_only_and_delete_removes_it(gateway, live_farm):
    key = live_farm.farm("keys", "create", "--session", "resp-alice").stdout.strip()
    other = live_farm.farm("keys", "create", "--session", "resp-bob").stdout.strip()
    try:
        mine, theirs = client(gateway, key), client(gateway, other)
        r = mine.responses.create(model=MODEL, input="Hi", max_output_tokens=3, metadata={"k": "v"})
        got = mine.responses.retrieve(r.id)
        assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"k": "v"}
        with pytest.raises(openai.NotFoundError):
            theirs.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError) as other_prev:
            theirs.responses.create(
                model=MODEL, input="Hi", previous_response_id=r.id, max_output_tokens=2
            )
        assert other_prev.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            theirs.responses.delete(r.id)
        mine.responses.delete(r.id)
        with pytest.raises(openai.NotFoundError):
            mine.responses.retrieve(r.id)
        unstored = mine.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
        with pytest.raises(openai.NotFoundError):
            mine.responses.retrieve(unstored.id)
    finally:
        with transaction(live_farm.database_url) as s:
            s.execute(delete(ApiKeyRecord))  # other tests' gateways need no key


BAD = [
    ({"input": 7}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "hi", "max_output_tokens": "5"}, "max_output_tokens"),
    ({"input": "hi", "temperature": 9}, "temperature"),
    ({"input": "hi", "store": "no"}, "store"),
    ({"input": "hi", "instructions": 3}, "instructions"),
    ({"input": "hi", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
    ({"input": "hi", "previous_response_id": "resp_\u0000"}, "previous_response_id"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), BAD)
def test_a_bad_body_is_a_400_naming_the_param_and_queues_nothing(gateway, live_farm, body, param):
    before = usage_rows(live_farm.database_url)
    r = httpx.post(f"{gateway}/v1/responses", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert usage_rows(live_farm.database_url) == before


def test_an_unknown_previous_response_id_is_a_404_naming_it(gateway, live_farm):
    before = usage_rows(live_farm.database_url)
    body = {"model": MODEL, "input": "hi", "previous_response_id": "resp_nope"}
    r = httpx.post(f"{gateway}/v1/responses", json=body, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    assert usage_rows(live_farm.database_url) == before


def test_an_input_longer_than_the_context_is_a_400_naming_input(gateway):
    with pytest.raises(openai.BadRequestError) as long:
        client(gateway).responses.create(model=MODEL, input="word " * 5000, max_output_tokens=2)
    assert long.value.body["param"] == "input"  # type: ignore[index]
    assert long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


class Answer(pydantic.BaseModel):
    ok: bool


def test_text_format_json_schema_constrains_the_reply_and_the_sdk_parses_it(gateway):
    c = client(gateway)
    parsed = c.responses.parse(
        model=MODEL, input="Is water wet?", text_format=Answer, max_output_tokens=30
    )
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Answer)
    with c.responses.stream(
        model=MODEL, input="Is fire hot?", text_format=Answer, max_output_tokens=30
    ) as stream:
        final = stream.get_final_response()  # needs response.completed
    assert isinstance(final.output_parsed, Answer)

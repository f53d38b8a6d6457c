"""Tool calling without a model: requests with tools checked at submit (and in batch files),
the plan per model family (which template renders the tools, the grammar llama.cpp must
accept), and the parser that turns a reply into calls, whole or piece by piece."""

from __future__ import annotations

import json

import pytest
from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

from farm.batches.lines import check
from farm.errors import BatchFileError, InvalidRequest
from farm.openai.api import BadBody, error, request_fields
from farm.request import make_request
from farm.tools.formats import GENERIC, HERMES, LLAMA3, MISTRAL, Family, family_for, plan
from farm.tools.parse import CallParser, call_id, parse_calls
from farm.tools.schema import Tool, ToolCallDelta

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/$defs/n"}},
            "required": ["a", "b"],
            "$defs": {"n": {"type": "integer"}},
        },
    },
}
USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
}


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": "gemma3-270m", "messages": [USER], "tools": [WEATHER, ADD], **extra}


def refused(body: dict[str, object]) -> tuple[int, dict[str, object]]:
    """The gateway's status and error for a body farm refuses before queueing."""
    with pytest.raises((BadBody, InvalidRequest)) as e:
        make_request(request_fields(body, chat=True))
    status, err = error(e.value)
    return status, err["error"]  # type: ignore[return-value]


# -- requests ------------------------------------------------------------------------------------
def test_a_chat_with_tools_calls_and_results_is_a_valid_request():
    body = chat_body(tool_choice="auto", parallel_tool_calls=False)
    body["messages"] = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [{**CALL, "index": 0}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    request = make_request(request_fields(body, chat=True))
    assert request.messages is not None and request.messages[1].tool_calls is not None
    assert request.messages[1].content == "" and request.messages[2].role == "tool"
    assert request.calls_tools and request.parallel_tool_calls is False
    assert request.input_size > len(json.dumps(WEATHER))  # the tools count towards the prompt


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
         "tools.0.function.parameters"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [USER, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
         "messages.1.tool_call_id"),
        ({"messages": [USER, {"role": "tool", "content": "x"}]}, "messages.1.tool_call_id"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)  # fmt: skip
def test_bad_tool_input_is_refused_naming_the_parameter(change, param):
    body = {**chat_body(), **change}
    status, err = refused(body)
    assert status == 400 and err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_a_batch_line_with_tools_is_checked_like_an_http_body():
    def line(n: int, body: dict[str, object]) -> str:
        return json.dumps(
            {"custom_id": f"q{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )

    good = line(1, chat_body(tool_choice="required"))
    [checked] = check(good.encode(), {"gemma3-270m": 4096})
    assert checked.request["tools"][0]["function"]["name"] == "get_weather"
    assert checked.request["tool_choice"] == "required"
    bad = line(2, chat_body(tool_choice={"type": "function", "function": {"name": "nope"}}))
    with pytest.raises(BatchFileError, match="tool_choice"):
        check(f"{good}\n{bad}".encode(), {"gemma3-270m": 4096})


# -- plans ---------------------------------------------------------------------------------------
QWEN = "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> <tool_call>..."
LLAMA = (
    "<|start_header_id|>ipython<|end_header_id|>{%- if tools %}{{ tools }}{% endif %}<|python_tag|>"
)
MISTRAL_T = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"


def test_the_family_comes_from_the_template_and_any_other_model_gets_the_generic_one():
    assert family_for(QWEN) is HERMES and family_for(LLAMA) is LLAMA3
    assert family_for(MISTRAL_T) is MISTRAL
    assert family_for(None) is GENERIC  # Gemma 3 270M's GGUF has no template
    gemma = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}{% endfor %}"
    assert family_for(gemma) is GENERIC


@pytest.mark.parametrize("template", [None, QWEN, LLAMA, MISTRAL_T])
@pytest.mark.parametrize(
    "choice", ["required", "auto", {"type": "function", "function": {"name": "add"}}]
)
def test_every_plan_grammar_parses_in_llama_cpp(template, choice):
    tools = [Tool.model_validate(WEATHER), Tool.model_validate(ADD)]
    named = make_request(chat_body(tool_choice=choice)).tool_choice
    p = plan(tools, named, template=template, to_gbnf=json_schema_to_gbnf)
    assert p.grammar is not None
    LlamaGrammar.from_string(p.grammar, verbose=False)  # raises when llama.cpp refuses it
    assert p.lazy == (choice == "auto")
    if p.lazy:
        assert p.lazy_patterns or p.lazy_tokens
    if isinstance(choice, dict):
        assert '"\\"add\\""' in p.grammar and "get_weather" not in p.grammar
    assert (p.template_tools is not None) == p.family.native


def test_a_model_without_a_tool_format_gets_the_tools_and_history_as_text():
    request = make_request(
        chat_body(
            messages=[
                {"role": "system", "content": "Be brief."},
                USER,
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
            ]
        )
    )
    assert request.messages is not None and request.tools is not None
    p = plan(request.tools, request.tool_choice, template=None)
    messages = p.messages(request.messages)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "<tools>" in messages[0]["content"] and messages[0]["content"].endswith("Be brief.")
    assert messages[2]["content"].startswith('<tool_call>{"name": "get_weather"')
    assert '"name": "get_weather", "content": "18 C"' in messages[3]["content"]
    native = plan(request.tools, "auto", template=QWEN).messages(request.messages)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris",
        "unit": "celsius",
    }
    assert native[3] == {
        "role": "tool",
        "content": "18 C",
        "tool_call_id": "call_1",
        "name": "get_weather",
    }


def test_tool_choice_none_offers_no_tools_and_no_grammar():
    p = plan([Tool.model_validate(WEATHER)], "none", template=QWEN, to_gbnf=json_schema_to_gbnf)
    assert p.grammar is None and p.template_tools is None and not p.calls


# -- parsing -------------------------------------------------------------------------------------
REPLIES = [
    (GENERIC, 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', 2),
    (HERMES, '<tool_call>\n{"arguments": {"a": 1, "b": 2}, "name": "add"}\n</tool_call>', 1),
    (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "a1b2c3d4e"}, {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]', 2),
    (LLAMA3, '{"name": "add", "parameters": {"a": 1, "b": [{"x": "}"}]}}', 1),
    (GENERIC, "Just text, no <tool_ call here.", 0),
    (LLAMA3, 'Text first, so {"name": "add"} is text.', 0),
]  # fmt: skip


@pytest.mark.parametrize(("family", "reply", "calls"), REPLIES)
def test_a_reply_streamed_in_pieces_gives_the_same_calls_as_parsed_whole(
    family: Family, reply: str, calls: int
):
    whole = parse_calls(family, reply, lambda i: f"call_{i}")
    assert len(whole.calls) == calls and not whole.truncated
    for c in whole.calls:
        json.loads(c.function.arguments)  # the model's own JSON text, whole
    for size in (1, 3, 7):
        parser = CallParser(family, lambda i: f"call_{i}")
        pieces = []
        for at in range(0, len(reply), size):
            pieces += parser.feed(reply[at : at + size])
        pieces += parser.close()
        assert parser.calls == whole.calls and parser.content == whole.content
        text = "".join(p for p in pieces if isinstance(p, str))
        assert text.strip() == whole.content.strip()
        deltas = [p for p in pieces if isinstance(p, ToolCallDelta)]
        for i, call in enumerate(whole.calls):
            mine = [d for d in deltas if d.index == i]
            assert (mine[0].id, mine[0].name, mine[0].arguments) == (
                call.id,
                call.function.name,
                "",
            )
            assert all(d.id is None for d in mine[1:])
            assert "".join(d.arguments for d in mine) == call.function.arguments
    if calls:
        assert "tool_call" not in whole.content and "TOOL_CALLS" not in whole.content


def test_a_call_cut_off_by_max_tokens_is_not_a_call():
    p = parse_calls(
        GENERIC, '<tool_call>{"name": "add", "arguments": {"a": 1', lambda i: call_id("", i)
    )
    assert p.calls == [] and p.truncated


def test_a_call_whose_close_marker_max_tokens_cut_is_a_call_and_the_marker_is_not_text():
    for cut in ("</", "</tool_", " </tool_call"):
        reply = f'Sure.<tool_call>{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}{cut}'
        whole = parse_calls(GENERIC, reply, lambda i: f"call_{i}")
        [call] = whole.calls
        assert call.function.arguments == '{"a": 1, "b": 2}' and not whole.truncated
        assert whole.content == "Sure."
        parser = CallParser(GENERIC, lambda i: f"call_{i}")
        pieces = [p for at in range(len(reply)) for p in parser.feed(reply[at])]
        pieces += parser.close()
        assert "".join(p for p in pieces if isinstance(p, str)) == "Sure."
    # The next call's open marker, cut off, is not text either.
    for cut in ("<tool_", " <tool_call"):
        reply = f'<tool_call>{{"name": "add", "arguments": {{"a": 1}}}}</tool_call>{cut}'
        whole = parse_calls(GENERIC, reply, lambda i: f"call_{i}")
        assert len(whole.calls) == 1 and whole.content == "" and not whole.truncated
    # Anything else after a call is still text.
    after = parse_calls(GENERIC, '<tool_call>{"name": "add", "arguments": {}}</tool_call> ok', str)
    assert after.content == "ok" and len(after.calls) == 1


def test_call_ids_are_stable_per_job_and_call_and_random_without_a_job():
    assert call_id("job-1", 0) == call_id("job-1", 0) != call_id("job-1", 1)
    assert call_id("job-1", 0).startswith("call_") and len(call_id("job-1", 0)) == 29
    assert call_id("", 0) != call_id("", 0)


# -- a template that renders tools (as Qwen 2.5's does), through the worker's chat prompt ------
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}Functions:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
Call one with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{%- for message in messages %}{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif not (tools and message.role == 'system') %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


class _TemplateModel:
    """What `chat_prompt` reads of a Llama whose GGUF has a chat template: its handler, and
    a tokenizer (one token per byte, so the prompt reads back as text)."""

    def __init__(self, template: str):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.chat_handler = None
        self.chat_format = "chat_template.default"
        self._chat_handlers = {
            self.chat_format: Jinja2ChatFormatter(template, "<|im_end|>", "").to_chat_handler()
        }
        self.metadata = {"tokenizer.chat_template": template}
        self.verbose = False

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return list(text)


def test_a_template_that_takes_tools_renders_them_and_the_calls_in_its_own_format():
    from workers.prepare import chat_prompt, tool_plan

    request = make_request(
        chat_body(
            messages=[
                USER,
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
            ]
        )
    )
    p = tool_plan(request, HERMES_TEMPLATE)
    assert p is not None and p.family is HERMES and p.lazy and p.grammar is not None
    assert request.messages is not None
    tokens, _ = chat_prompt(_TemplateModel(HERMES_TEMPLATE), request.messages, p)
    prompt = bytes(tokens).decode()
    assert '"name": "get_weather", "description": "The weather now in a city"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in prompt
    assert "<tool_response>\n18 C\n</tool_response>" in prompt
    assert "You can call functions" not in prompt  # farm's generic text is not added

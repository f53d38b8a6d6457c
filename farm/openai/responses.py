"""OpenAI's Responses API shapes: a /v1/responses body into a chat body for farm's Request
(farm/openai/api.py), and a Completion into a response object and its stream's events.

    input (a string, or items: messages, function_call, function_call_output),
    instructions, tools (flat function tools), tool_choice, max_output_tokens, temperature,
    top_p, text.format, parallel_tool_calls
      -> `chat_body`: the chat body farm's chat route takes (BadBody naming the param)
    a Completion -> `output_items`, `response_object`; `StreamEvents` numbers the events.

Items are kept as OpenAI spells them (a stored response's conversation is a list of them);
`messages` turns a list of items into chat messages, function calls into an assistant
message's tool_calls and their outputs into tool messages. `ResponsesBody` says what
`check_body` and `chat_body` take as a pydantic model, only for the gateway's /openapi.json.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from farm.openai.api import BadBody, json_type
from farm.request import MAX_TOKENS_LIMIT, valid_text

# What a Responses body may hold besides what `chat_body` converts.
PARAMS = (
    "model", "input", "instructions", "tools", "tool_choice", "max_output_tokens",
    "temperature", "top_p", "text", "parallel_tool_calls", "previous_response_id", "store",
    "metadata", "stream", "user", "seed",
)  # fmt: skip
TYPES = {
    "instructions": (str,), "previous_response_id": (str,), "store": (bool,),
    "stream": (bool,), "metadata": (dict,), "text": (dict,), "tools": (list,),
    "tool_choice": (str, dict), "user": (str,),
}  # fmt: skip
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")


class InputTextPart(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


_Content = str | list[InputTextPart]


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: _Content


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="the arguments as a JSON string")
    id: str | None = None


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"]
    call_id: str
    output: _Content


class FunctionTool(BaseModel):
    """A function tool, flat as the Responses API has it."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema")
    strict: bool | None = None


class FunctionToolChoice(BaseModel):
    type: Literal["function"]
    name: str


_Item = MessageItem | FunctionCallItem | FunctionCallOutputItem


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(BaseModel):
    format: TextFormat | None = None


class ResponsesBody(BaseModel):
    """POST /v1/responses (documented; `check_body` and `chat_body` read it)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="one of GET /v1/models")
    input: str | Annotated[list[_Item], Field(min_length=1)] = Field(
        description="a user message, or a non-empty list of items"
    )
    instructions: str | None = Field(default=None, description="a system message first")
    previous_response_id: str | None = Field(
        default=None, description="continue a stored response's conversation"
    )
    store: bool | None = Field(default=None, description="keep the response (default true)")
    stream: bool | None = Field(default=None, description="the Responses event stream")
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    text: TextOptions | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None


def check_body(body: Any) -> dict[str, Any]:
    """`body` if it is a Responses body farm takes; BadBody naming the param otherwise."""
    if not isinstance(body, dict):
        raise BadBody("the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise BadBody("'model' is required: one of GET /v1/models", "model")
    for name in body:
        if name not in PARAMS:
            raise BadBody(f"unknown parameter '{name}'", name)
    for name, kinds in TYPES.items():
        value = body.get(name)
        if value is not None and not isinstance(value, kinds):
            what = " or ".join({str: "a string", bool: "a boolean", dict: "an object",
                                list: "an array"}[k] for k in kinds)  # fmt: skip
            raise BadBody(f"invalid '{name}': must be {what}, not {json_type(value)}", name)
    if "input" not in body:
        raise BadBody("'input' is required: a string, or a list of items", "input")
    return body


def valid_id(value: str) -> str:
    """`previous_response_id` as text a database can look up (a NUL is a 400, not a 500)."""
    try:
        return valid_text(value)
    except ValueError as e:
        raise BadBody(f"invalid 'previous_response_id': {e}", "previous_response_id") from None


def input_items(value: Any) -> list[dict[str, Any]]:
    """The body's `input` as a list of items, each checked (BadBody naming it otherwise)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadBody("'input' must be a string or a non-empty list of items", "input")
    return [_item(item, f"input.{i}") for i, item in enumerate(value)]


def _item(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise BadBody(f"{where} must be an object, not {json_type(item)}", where)
    kind = item.get("type", "message")
    if kind == "message":
        if item.get("role") not in ROLES:
            raise BadBody(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        return {
            "type": "message",
            "role": item["role"],
            "content": _text(item.get("content"), f"{where}.content"),
        }
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise BadBody(f"{where}.{name} must be a string", f"{where}.{name}")
        kept = {k: item[k] for k in ("type", "id", "call_id", "name", "arguments") if k in item}
        return {**kept, "type": "function_call"}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise BadBody(f"{where}.call_id must be a string", f"{where}.call_id")
        output = _text(item.get("output"), f"{where}.output")
        return {"type": "function_call_output", "call_id": item["call_id"], "output": output}
    raise BadBody(
        f"{where} is a '{str(kind)[:40]}' item: farm takes message, function_call and "
        "function_call_output items",
        f"{where}.type",
    )


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or text parts (input_text, output_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadBody(f"{where} must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else json_type(part)
            raise BadBody(
                f"{where}[{j}] is a '{str(kind)[:40]}' part: farm's models take text only "
                "(input_text parts)",
                f"{where}.{j}",
            )
        if not isinstance(part.get("text"), str):
            raise BadBody(f"{where}[{j}].text must be a string", f"{where}.{j}.text")
        texts.append(part["text"])
    return "".join(texts)


def messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for a conversation's items: a run of function calls becomes one
    assistant message's tool_calls (joined to the assistant's text just before them)."""
    out: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            out.append({"role": item["role"], "content": item["content"]})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return out


def _tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools.{i}"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else json_type(tool)
        raise BadBody(
            f"tools[{i}] is a '{str(kind)[:40]}' tool: farm takes function tools only",
            f"{where}.type",
        )
    function = {k: v for k, v in tool.items() if k != "type"}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise BadBody(
                '\'tool_choice\' must be none, auto, required or {"type": "function", "name": ...}',
                "tool_choice",
            )
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict[str, Any]) -> dict[str, Any] | None:
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadBody("'text.format' must be text, json_object or json_schema", "text.format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": schema}


def chat_body(body: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat body (for farm.openai.api.request_fields) of a Responses body whose whole
    conversation is `items`."""
    chat: dict[str, Any] = {"model": body["model"], "messages": messages(items)}
    if body.get("instructions"):
        chat["messages"].insert(0, {"role": "system", "content": body["instructions"]})
    if body.get("tools"):
        chat["tools"] = [_tool(t, i) for i, t in enumerate(body["tools"])]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls", "seed", "user"):
        if body.get(name) is not None:
            chat[name] = body[name]
    fmt = _response_format(body.get("text") or {})
    if fmt is not None:
        chat["response_format"] = fmt
    return chat


# farm's chat parameters named as the Responses API names them, in error messages.
RENAMES = {
    "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
    "response_format": "text.format", "messages": "input",
}  # fmt: skip


def renamed(param: str | None) -> str | None:
    """A chat body's param as the Responses body names it."""
    if param is None:
        return None
    head = param.partition(".")[0]
    if head == "tools" and ".function" in param:
        return param.replace(".function", "")
    return RENAMES.get(head, head) if head in RENAMES else param


def message_id(job_id: str) -> str:
    return f"msg_{job_id}"


def call_item_id(job_id: str, i: int) -> str:
    return f"fc_{job_id}_{i}"


def output_items(c: Any, *, status: str = "completed") -> list[dict[str, Any]]:
    """A Completion's output items: its text as a message (when it has text or no calls),
    then one function_call item per call."""
    items: list[dict[str, Any]] = []
    calls = c.tool_calls or []
    if c.text or not calls:
        items.append(message_item(c.job_id, c.text, status))
    for i, call in enumerate(calls):
        items.append(call_item(c.job_id, i, call.id, call.function.name, call.function.arguments))
    return items


def message_item(job_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [text_part(text)]
    return {"type": "message", "id": message_id(job_id), "role": "assistant", "status": status,
            "content": content}  # fmt: skip


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(job_id: str, i: int, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:  # fmt: skip
    return {"type": "function_call", "id": call_item_id(job_id, i), "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}  # fmt: skip


def as_input(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items as the conversation keeps them (input items' shape)."""
    kept: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            text = "".join(p["text"] for p in item["content"])
            kept.append({"type": "message", "role": "assistant", "content": text})
        else:
            kept.append({k: item[k] for k in ("type", "id", "call_id", "name", "arguments")})
    return kept


def usage(c: Any) -> dict[str, Any]:
    u = c.usage
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def response_object(
    response_id: str, body: dict[str, Any], *, created_at: int, c: Any = None
) -> dict[str, Any]:
    """The response object: in progress (no Completion yet), or its outcome from `c`."""
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    out: dict[str, Any] = {
        "id": response_id, "object": "response", "created_at": created_at,
        "status": "in_progress", "completed_at": None, "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": body["model"],
        "output": [], "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True), "temperature": body.get("temperature"),
        "text": {"format": fmt}, "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [], "top_p": body.get("top_p"), "truncation": "disabled",
        "usage": None, "metadata": body.get("metadata") or {}, "user": body.get("user"),
    }  # fmt: skip
    if c is not None:
        incomplete = c.finish_reason in ("length", "time")
        status = "incomplete" if incomplete else "completed"
        out.update(
            status=status,
            completed_at=int(time.time()),
            output=output_items(c, status=status),
            usage=usage(c),
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
        )
    return out


class StreamEvents:
    """A response's server-sent events, each with its `type` and `sequence_number`."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

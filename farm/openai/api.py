"""OpenAI's HTTP shapes, shared by the gateway and batch files: request bodies into farm's Request fields, Completions into
responses and stream chunks, farm's errors into OpenAI's error body and status code.

The bodies are read by hand (`request_fields`), for OpenAI's error messages naming the
parameter; farm/openai/shapes.py says the same shapes as pydantic models, only to document
them in the gateway's /openapi.json (tests/test_openapi.py checks that the two agree)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from farm.errors import (
    BatchFileError,
    FarmError,
    FarmUnavailable,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    NoLiveWorker,
    QueueFull,
    QuotaExceeded,
    RateLimited,
    UnknownBatch,
    UnknownJob,
    UnknownModel,
)
from farm.openai.choices import (
    CHAT_PARAMS,
    COMPLETION_PARAMS,
    BadBody,
    chat_logprobs,
    choice_fields,
    completion_logprobs,
)

__all__ = ["BadBody"]  # raised here, defined beside the parameters it checks most

# OpenAI's names that farm's Request takes as they are (flat sampling and stopping fields).
SAME = (
    "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "stop",
    "response_format", "top_k", "min_p", "typical_p", "repeat_penalty", "penalty_last_n",
    "mirostat_mode", "mirostat_tau", "mirostat_eta", "grammar", "max_time_ms",
    "tools", "tool_choice", "parallel_tool_calls", "draft_max",
)  # fmt: skip
IGNORED = ("user", "stream_options", "stream", "model", "metadata", "store")
FINISH = {"stop": "stop", "length": "length", "time": "length", "cancelled": "stop"}


class BodyTooLarge(BadBody):
    """A request body over the gateway's limit (FARM_GATEWAY_MAX_BODY): 413."""


def parse_body(raw: bytes) -> Any:
    """A request's JSON body, or BadBody saying why it is not one."""
    try:
        return json.loads(raw)
    except RecursionError:  # Python's parser gives up near 1,000 levels
        raise BadBody("the request body nests too deep: no parameter takes that") from None
    except ValueError:  # not JSON, or not UTF-8
        raise BadBody("the request body is not JSON") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_stop(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


# OpenAI's types for the parameters farm reads (strict, as OpenAI's are: "2" is not an
# integer, "false" not a boolean); null means "the default" for each of them.
_INT, _NUMBER = ("an integer", _is_int), ("a number", _is_number)
_BOOL = ("a boolean", lambda v: isinstance(v, bool))
_STRING = ("a string", lambda v: isinstance(v, str))
_OBJECT = ("an object", lambda v: isinstance(v, dict))
TYPES: dict[str, tuple[str, Any]] = {
    "max_tokens": _INT, "max_completion_tokens": _INT, "n": _INT, "seed": _INT,
    "top_k": _INT, "penalty_last_n": _INT, "mirostat_mode": _INT, "max_time_ms": _INT,
    "draft_max": _INT,
    "temperature": _NUMBER, "top_p": _NUMBER, "min_p": _NUMBER, "typical_p": _NUMBER,
    "frequency_penalty": _NUMBER, "presence_penalty": _NUMBER, "repeat_penalty": _NUMBER,
    "mirostat_tau": _NUMBER, "mirostat_eta": _NUMBER,
    "stream": _BOOL, "store": _BOOL, "stream_options": _OBJECT, "response_format": _OBJECT,
    "metadata": _OBJECT, "user": _STRING, "grammar": _STRING,
    "tools": ("an array", lambda v: isinstance(v, list)), "parallel_tool_calls": _BOOL,
    "tool_choice": ("a string or an object", lambda v: isinstance(v, str | dict)),
    "top_logprobs": _INT, "best_of": _INT, "echo": _BOOL, "suffix": _STRING,
    "logit_bias": _OBJECT,
    "stop": ("a string or an array of strings", _is_stop),
}  # fmt: skip


def json_type(v: Any) -> str:
    """How JSON names the type of `v`, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}  # fmt: skip
    return names.get(type(v), type(v).__name__)


def _typed(body: dict[str, Any], chat: bool) -> None:
    """BadBody naming the first parameter whose JSON type is not OpenAI's."""
    for name, value in body.items():
        if value is None or (name not in TYPES and name != "logprobs"):
            continue
        what, ok = (_BOOL if chat else _INT) if name == "logprobs" else TYPES[name]
        if not ok(value):
            raise BadBody(f"invalid '{name}': must be {what}, not {json_type(value)}", name)
    options = body.get("stream_options")
    if options is not None:
        if body.get("stream") is not True:
            raise BadBody(
                "'stream_options' is only allowed when 'stream' is true", "stream_options"
            )
        for key, value in options.items():
            if key not in ("include_usage", "include_obfuscation"):
                raise BadBody(f"unknown parameter 'stream_options.{key}'", f"stream_options.{key}")
            if not isinstance(value, bool):
                raise BadBody(
                    f"invalid 'stream_options.{key}': must be a boolean, not {json_type(value)}",
                    f"stream_options.{key}",
                )


def request_fields(body: Any, *, chat: bool) -> dict[str, Any]:
    """farm.submit's fields for an OpenAI body (BadBody naming the field otherwise)."""
    if not isinstance(body, dict):
        raise BadBody("the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise BadBody("'model' is required: one of GET /v1/models", "model")
    _typed(body, chat)
    fields: dict[str, Any] = {"model": body["model"]}
    key = "messages" if chat else "prompt"
    if key not in body:
        raise BadBody(f"'{key}' is required", key)
    if chat:
        fields["messages"] = [_message(m, i) for i, m in enumerate(_listed(body[key], key))]
    else:
        fields["prompt"] = _prompt(body[key])
    prompts = len(fields["prompt"]) if isinstance(fields.get("prompt"), list) else 1
    fields.update(choice_fields(body, chat=chat, prompts=prompts))
    most = body.get("max_completion_tokens", body.get("max_tokens"))
    if most is not None:
        fields["max_tokens"] = most
    for name in SAME:
        if name in body and body[name] is not None:
            value = body[name]
            fields[name] = [value] if name == "stop" and isinstance(value, str) else value
    extras = CHAT_PARAMS if chat else COMPLETION_PARAMS
    unknown = sorted(
        set(body) - set(SAME) - set(IGNORED) - set(extras)
        - {key, "max_tokens", "max_completion_tokens"}
    )  # fmt: skip
    if unknown:
        raise BadBody(f"unknown parameter '{unknown[0]}'", unknown[0])
    return fields


def _prompt(prompt: Any) -> str | list[str]:
    """A prompt, or a list of them (each gets its own choices)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        raise BadBody(
            "'prompt' as token ids is not supported: send the text (or a list of texts)",
            "prompt",
        )
    raise BadBody("'prompt' must be a string or a non-empty list of strings", "prompt")


def _listed(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise BadBody(f"'{name}' must be a non-empty list", name)
    return value


ROLES = ("system", "user", "assistant", "developer", "tool")


def _message(m: Any, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise BadBody(
            f"messages[{i}] needs a role: system, user, assistant or tool", f"messages.{i}"
        )
    content = m.get("content")
    calls = m.get("tool_calls") if m["role"] == "assistant" else None
    if isinstance(content, list):
        content = "".join(_text_part(p, i, j) for j, p in enumerate(content))
    if content is None and calls:
        content = ""  # an assistant message that only calls tools
    if not isinstance(content, str):
        raise BadBody(f"messages[{i}].content must be text", f"messages.{i}.content")
    role = "system" if m["role"] == "developer" else m["role"]
    out: dict[str, Any] = {"role": role, "content": content}
    if calls:
        out["tool_calls"] = _calls(calls, i)
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise BadBody(
                f"messages[{i}] is a tool result: 'tool_call_id' names the call it answers",
                f"messages.{i}.tool_call_id",
            )
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _calls(calls: Any, i: int) -> list[Any]:
    """An assistant message's tool calls with the fields farm reads (a client's own extras,
    such as a streamed call's `index`, are dropped); their shape is checked by farm's Request."""
    if not isinstance(calls, list):
        raise BadBody(f"messages[{i}].tool_calls must be an array", f"messages.{i}.tool_calls")
    out: list[Any] = []
    for j, c in enumerate(calls):
        if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
            raise BadBody(
                f"messages[{i}].tool_calls[{j}] must be an object with 'id' and 'function'",
                f"messages.{i}.tool_calls.{j}",
            )
        f = c["function"]
        out.append(
            {
                "id": c.get("id"),
                "type": c.get("type", "function"),
                "function": {"name": f.get("name"), "arguments": f.get("arguments")},
            }
        )
    return out


def _text_part(part: Any, i: int, j: int) -> str:
    """A content part's text; BadBody naming the part for any other kind (an image, audio,
    a file: farm's models take text only) or a malformed one."""
    where = f"messages[{i}].content[{j}]"
    param = f"messages.{i}.content.{j}"
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise BadBody(f"{where} must be an object with a 'type', such as 'text'", param)
    if part["type"] != "text":
        raise BadBody(
            f"{where} is a '{part['type'][:40]}' part: farm's models take text only; "
            "send the content as text parts",
            param,
        )
    text = part.get("text")
    if not isinstance(text, str):
        raise BadBody(f"{where}.text must be a string, not {json_type(text)}", f"{param}.text")
    return text


def usage(c: Any) -> dict[str, Any]:
    u = c.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def finish_reason(c: Any) -> str:
    """OpenAI's finish reason for a Completion: `tool_calls` when it ended on its calls."""
    if getattr(c, "tool_calls", None) and c.finish_reason == "stop":
        return "tool_calls"
    return FINISH.get(c.finish_reason, "stop")


def chat_message(c: Any) -> dict[str, Any]:
    """The assistant's message of a Completion: its text, or its tool calls (content null)."""
    calls = getattr(c, "tool_calls", None)
    if not calls:
        return {"role": "assistant", "content": c.text}
    return {
        "role": "assistant",
        "content": c.text or None,
        "tool_calls": [call.model_dump() for call in calls],
    }


def chat_response(c: Any) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{c.job_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": c.model,
        "choices": [
            {
                "index": choice.index,
                "message": chat_message(choice),
                "finish_reason": finish_reason(choice),
                "logprobs": chat_logprobs(choice.logprobs),
            }
            for choice in c.all_choices()
        ],
        "usage": usage(c),
    }


def completion_response(c: Any) -> dict[str, Any]:
    return {
        "id": f"cmpl-{c.job_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": c.model,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "finish_reason": FINISH.get(choice.finish_reason, "stop"),
                "logprobs": completion_logprobs(choice.logprobs),
            }
            for choice in c.all_choices()
        ],
        "usage": usage(c),
    }


def tool_call_delta(d: Any) -> dict[str, Any]:
    """A `ToolCallDelta` as OpenAI streams it: the first piece of a call with its id, type
    and name, the next ones with pieces of its arguments."""
    if d.id is None:
        return {"index": d.index, "function": {"arguments": d.arguments}}
    return {
        "index": d.index,
        "id": d.id,
        "type": "function",
        "function": {"name": d.name, "arguments": d.arguments},
    }


def chunk(job_id: str, model: str, *, chat: bool, text: str | None = None, finish: str | None = None,
          role: bool = False, usage_of: Any = None, index: int = 0,
          logprobs: list[dict[str, Any]] | None = None, tool_call: Any = None) -> str:  # fmt: skip
    """One server-sent event of a stream: choice `index`'s text (with the logprobs of the
    tokens it brings, when asked for), a piece of one of its tool calls (a ToolCallDelta),
    its role, its finish, or the usage."""
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_call is not None:
            delta["tool_calls"] = [tool_call_delta(tool_call)]
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = chat_logprobs(logprobs)
        body: dict[str, Any] = {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk"}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish,
                  "logprobs": completion_logprobs(logprobs)}  # fmt: skip
        body = {"id": f"cmpl-{job_id}", "object": "text_completion"}
    body.update(
        created=int(time.time()),
        model=model,
        choices=[] if usage_of is not None else [choice],
    )
    if usage_of is not None:
        body["usage"] = usage(usage_of)
    return f"data: {json.dumps(body)}\n\n"


def error(e: Exception, *, chat: bool = True) -> tuple[int, dict[str, Any]]:
    """OpenAI's status code and error body for one of farm's errors; `chat`: whether the
    request was a chat one (a prompt too long is then in 'messages', else in 'prompt')."""
    # farm's Request nests sampling and stopping fields; OpenAI's are flat.
    message = re.sub(r"'(?:sampling|stopping)\.", "'", str(e))
    if isinstance(e, BodyTooLarge):
        return 413, _body(message, "invalid_request_error", None, "request_too_large")
    if isinstance(e, BadBody):
        return 400, _body(message, "invalid_request_error", e.param, None)
    if isinstance(e, BatchFileError):
        return 400, _body(message, "invalid_request_error", "input_file_id", "invalid_batch_file")
    if isinstance(e, InvalidRequest):
        found = re.search(r"invalid '([^']+)'", message) or re.search(
            r"unknown field '([^']+)'", message
        )
        param = found.group(1) if found else None  # sampling./stopping. are gone above
        return 400, _body(message, "invalid_request_error", param, None)
    if isinstance(e, UnknownModel):
        return 404, _body(message, "invalid_request_error", "model", "model_not_found")
    if isinstance(e, UnknownBatch | UnknownJob):
        return 404, _body(message, "invalid_request_error", None, "not_found")
    if isinstance(e, QueueFull | QuotaExceeded):
        limited = isinstance(e, QueueFull | RateLimited)
        code = "rate_limit_exceeded" if limited else "insufficient_quota"
        return 429, _body(message, "rate_limit_error", None, code)
    if isinstance(e, NoLiveWorker):
        # The client's own message names CLI flags; an HTTP caller can only wait and retry.
        model = re.search(r"model '([^']+)'", message)
        name = model.group(1) if model else "this model"
        message = (
            f"no worker is serving model '{name}' right now; retry later. The farm's "
            f"operator starts one with `farm worker --model {name}` (or `farm up`)"
        )
        return 503, _body(message, "server_error", None, "service_unavailable")
    if isinstance(e, FarmUnavailable):
        return 503, _body(message, "server_error", None, "service_unavailable")
    if isinstance(e, JobFailed) and "tokens but model" in message:
        param = "messages" if chat else "prompt"
        return 400, _body(message, "invalid_request_error", param, "context_length_exceeded")
    if (
        isinstance(e, JobFailed) and "invalid 'logit_bias'" in message
    ):  # a token past the vocabulary
        return 400, _body(message, "invalid_request_error", "logit_bias", None)
    if isinstance(e, JobCancelled):
        return 499, _body(message, "request_cancelled", None, None)
    if isinstance(e, FarmError):
        return 500, _body(message, "server_error", None, None)
    return 500, _body("the gateway hit an error; see its log", "server_error", None, None)


def _body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

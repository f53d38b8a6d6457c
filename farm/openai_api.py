"""OpenAI's HTTP shapes, shared by the gateway and batch files: request bodies into farm's Request fields, Completions into
responses and stream chunks, farm's errors into OpenAI's error body and status code."""

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
    UnknownBatch,
    UnknownModel,
)

# OpenAI's names that farm's Request takes as they are (flat sampling and stopping fields).
SAME = (
    "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "stop",
    "response_format", "top_k", "min_p", "typical_p", "repeat_penalty", "penalty_last_n",
    "mirostat_mode", "mirostat_tau", "mirostat_eta", "grammar", "max_time_ms",
)  # fmt: skip
IGNORED = ("user", "stream_options", "n", "stream", "model", "logprobs", "metadata", "store")
FINISH = {"stop": "stop", "length": "length", "time": "length", "cancelled": "stop"}


class BadBody(InvalidRequest):
    """The HTTP body is not what the endpoint takes; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def request_fields(body: Any, *, chat: bool) -> dict[str, Any]:
    """farm.submit's fields for an OpenAI body (BadBody naming the field otherwise)."""
    if not isinstance(body, dict):
        raise BadBody("the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise BadBody("'model' is required: one of GET /v1/models", "model")
    if body.get("n", 1) != 1:
        raise BadBody("only n=1 is supported", "n")
    if body.get("logprobs"):
        raise BadBody("logprobs are not supported", "logprobs")
    fields: dict[str, Any] = {"model": body["model"]}
    key = "messages" if chat else "prompt"
    if key not in body:
        raise BadBody(f"'{key}' is required", key)
    if chat:
        fields["messages"] = [_message(m, i) for i, m in enumerate(_listed(body[key], key))]
    else:
        prompt = body[key]
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadBody("'prompt' must be a string (one prompt per request)", "prompt")
        fields["prompt"] = prompt
    most = body.get("max_completion_tokens", body.get("max_tokens"))
    if most is not None:
        fields["max_tokens"] = most
    for name in SAME:
        if name in body and body[name] is not None:
            value = body[name]
            fields[name] = [value] if name == "stop" and isinstance(value, str) else value
    unknown = sorted(
        set(body) - set(SAME) - set(IGNORED) - {key, "max_tokens", "max_completion_tokens"}
    )
    if unknown:
        raise BadBody(f"unknown parameter '{unknown[0]}'", unknown[0])
    return fields


def _listed(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise BadBody(f"'{name}' must be a non-empty list", name)
    return value


def _message(m: Any, i: int) -> dict[str, str]:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
        raise BadBody(f"messages[{i}] needs a role: system, user or assistant", f"messages.{i}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise BadBody(f"messages[{i}].content must be text", f"messages.{i}.content")
    role = "system" if m["role"] == "developer" else m["role"]
    return {"role": role, "content": content}


def usage(c: Any) -> dict[str, Any]:
    u = c.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def chat_response(c: Any) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{c.job_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": c.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": FINISH.get(c.finish_reason, "stop"),
                "logprobs": None,
            }
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
                "index": 0,
                "text": c.text,
                "finish_reason": FINISH.get(c.finish_reason, "stop"),
                "logprobs": None,
            }
        ],
        "usage": usage(c),
    }


def chunk(job_id: str, model: str, *, chat: bool, text: str | None = None, finish: str | None = None,
          role: bool = False, usage_of: Any = None) -> str:  # fmt: skip
    """One server-sent event of a stream."""
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        body: dict[str, Any] = {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk"}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
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
    if isinstance(e, BadBody):
        return 400, _body(message, "invalid_request_error", e.param, None)
    if isinstance(e, BatchFileError):
        return 400, _body(message, "invalid_request_error", "input_file_id", "invalid_batch_file")
    if isinstance(e, InvalidRequest):
        found = re.search(r"invalid '([^']+)'", message) or re.search(
            r"unknown field '([^']+)'", message
        )
        param = found.group(1).split(".")[-1] if found else None
        return 400, _body(message, "invalid_request_error", param, None)
    if isinstance(e, UnknownModel):
        return 404, _body(message, "invalid_request_error", "model", "model_not_found")
    if isinstance(e, UnknownBatch):
        return 404, _body(message, "invalid_request_error", None, "not_found")
    if isinstance(e, QueueFull | QuotaExceeded):
        code = "rate_limit_exceeded" if isinstance(e, QueueFull) else "insufficient_quota"
        return 429, _body(message, "rate_limit_error", None, code)
    if isinstance(e, NoLiveWorker | FarmUnavailable):
        return 503, _body(message, "server_error", None, "service_unavailable")
    if isinstance(e, JobFailed) and "tokens but model" in message:
        param = "messages" if chat else "prompt"
        return 400, _body(message, "invalid_request_error", param, "context_length_exceeded")
    if isinstance(e, JobCancelled):
        return 499, _body(message, "request_cancelled", None, None)
    if isinstance(e, FarmError):
        return 500, _body(message, "server_error", None, None)
    return 500, _body("the gateway hit an error; see its log", "server_error", None, None)


def _body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

"""A batch file, checked whole before anything is queued.

OpenAI's batch input format: one JSON object per line,

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gemma3-270m", "messages": [...], "max_tokens": 64}}

with `url` "/v1/chat/completions", "/v1/completions" or "/v1/embeddings" (the classic
nightly embedding of a corpus) and `body` what that endpoint takes. Every bad line is reported as `LINE: field: reason`; one bad line and nothing is
queued. Blank lines are skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from farm.config import Settings
from farm.errors import BatchFileError, InvalidRequest
from farm.openai import api as openai_api
from farm.openai import embeddings as openai_embeddings
from farm.request import Request, Stopping, oversized, valid_text

EMBEDDINGS_URL = "/v1/embeddings"
URLS = {"/v1/chat/completions": True, "/v1/completions": False, EMBEDDINGS_URL: False}
MAX_LINES = 200_000
MAX_BYTES = 200 * 1024 * 1024
MAX_CUSTOM_ID = 512
KEPT_ERRORS = 10_000
DEFAULT_MAX_CHARS: int = Settings.model_fields["max_prompt_chars"].default


@dataclass(frozen=True)
class Line:
    """One checked line: what the feeder needs to queue it."""

    number: int  # 1-based, in the file
    custom_id: str
    chat: bool
    request: dict[str, Any]  # the Request's fields on the wire, without routing
    url: str = ""  # the line's endpoint


def content_hash(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def check(
    content: bytes,
    models: dict[str, int],
    *,
    source: str = "the batch file",
    endpoint: str | None = None,
    embedders: frozenset[str] = frozenset(),
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[Line]:
    """The file's lines, each checked; BatchFileError listing every bad one otherwise.

    `models`: the registered, enabled models and their context sizes. `endpoint`: the url
    every line must have, when the batch was created for one. `embedders`: the models that
    serve embeddings. `max_chars`: the most text one line's request may carry
    (the farm's FARM_MAX_PROMPT_CHARS; its default otherwise)."""
    if len(content) > MAX_BYTES:
        raise InvalidRequest(
            f"{source} is {len(content) / 2**20:.0f} MiB; a batch file may be at most "
            f"{MAX_BYTES // 2**20} MiB: split it into several batches"
        )
    lines: list[Line] = []
    errors: list[str] = []
    bad = 0
    seen: dict[str, int] = {}
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = _line(number, raw, models, seen, endpoint, embedders, max_chars)
        except _Bad as e:
            bad += 1
            if len(errors) < KEPT_ERRORS:
                errors.append(f"{number}: {e.field}: {e.reason}")
            continue
        lines.append(line)
        if len(lines) + bad > MAX_LINES:
            raise InvalidRequest(
                f"{source} has more than {MAX_LINES} lines: split it into several batches"
            )
    if bad:
        raise BatchFileError(errors, bad, source)
    if not lines:
        raise InvalidRequest(f"{source} holds no requests: one JSON object per line")
    return lines


class _Bad(Exception):
    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason


def _line(
    number: int,
    raw: bytes,
    models: dict[str, int],
    seen: dict[str, int],
    endpoint: str | None,
    embedders: frozenset[str],
    max_chars: int,
) -> Line:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("line", "not UTF-8 text") from None
    try:
        item = json.loads(text)
    except RecursionError:
        raise _Bad("line", "nested too deeply to be a request") from None
    except json.JSONDecodeError as e:
        raise _Bad(
            "line", f"not JSON ({e.msg} at column {e.colno}): one JSON object per line"
        ) from None
    if not isinstance(item, dict):
        raise _Bad("line", f"a JSON object is needed, not {type(item).__name__}")
    unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise _Bad(unknown[0], "unknown field; a line has custom_id, method, url and body")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _Bad("custom_id", "a non-empty string is needed, to match results to requests")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise _Bad("custom_id", f"at most {MAX_CUSTOM_ID} characters")
    try:
        valid_text(custom_id)  # it is stored: PostgreSQL refuses a NUL
    except ValueError as e:
        raise _Bad("custom_id", str(e)) from None
    if custom_id in seen:
        raise _Bad("custom_id", f"'{_short(custom_id)}' is also on line {seen[custom_id]}")
    seen[custom_id] = number
    if item.get("method", "POST") != "POST":
        raise _Bad("method", "must be POST")
    url = item.get("url")
    if url not in URLS:
        raise _Bad("url", f"must be one of {', '.join(URLS)} (got {_short(repr(url))})")
    if endpoint is not None and url != endpoint:
        raise _Bad("url", f"must be {endpoint}, the batch's endpoint (got {url})")
    chat = URLS[url]
    body = item.get("body")
    if not isinstance(body, dict):
        raise _Bad("body", "a JSON object is needed: the request the url takes")
    if url == EMBEDDINGS_URL:
        fields = _embedding(body, models, embedders, max_chars)
        return Line(number, custom_id, False, fields, url)
    return Line(number, custom_id, chat, _request(body, chat, models, max_chars), url)


def _embedding(
    body: dict[str, Any], models: dict[str, int], embedders: frozenset[str], max_chars: int
) -> dict[str, Any]:
    try:
        fields = openai_embeddings.embedding_fields(body)
    except openai_api.BadBody as e:
        raise _Bad(f"body.{e.param}" if e.param else "body", str(e)) from None
    return _checked(fields, models, max_chars, embedders)


def _request(
    body: dict[str, Any], chat: bool, models: dict[str, int], max_chars: int
) -> dict[str, Any]:
    # Against the model's context first: before farm's global cap says something else.
    model = body.get("model")
    if isinstance(model, str) and model in models:
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        most = body.get(field, Stopping.model_fields["max_tokens"].default)
        if isinstance(most, int) and most > models[model]:
            raise _Bad(
                f"body.{field}",
                f"{most} is more than model '{model}' holds (context {models[model]} tokens)",
            )
    if body.get("stream"):
        raise _Bad("body.stream", "streaming is not available in a batch; leave it out")
    try:
        fields = openai_api.request_fields(body, chat=chat)
    except openai_api.BadBody as e:
        raise _Bad(f"body.{e.param}" if e.param else "body", str(e)) from None
    return _checked(fields, models, max_chars)


def _checked(
    fields: dict[str, Any],
    models: dict[str, int],
    max_chars: int,
    embedders: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The line's Request on the wire, without routing; _Bad naming the field otherwise."""
    try:
        request = Request.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"]]
        field = loc[1] if len(loc) > 1 and loc[0] in ("sampling", "stopping") else ".".join(loc)
        reason = first["msg"].removeprefix("Value error, ")
        if first["type"] != "missing" and loc:
            reason += f" (got {_short(repr(first.get('input')))})"
        raise _Bad(f"body.{field}" if field else "body", reason) from None
    refused = oversized(request, max_chars)
    if refused is not None:
        raise _Bad(f"body.{refused[0]}", refused[1])
    if request.model not in models:
        known = ", ".join(sorted(models)) or "none yet (`farm models add`)"
        raise _Bad("body.model", f"unknown model '{request.model}'; registered: {known}")
    if request.is_embedding and request.model not in embedders:
        serving = ", ".join(sorted(embedders)) or "none (register one with `embedding = true`)"
        raise _Bad(
            "body.model",
            f"model '{request.model}' does not serve embeddings; those that do: {serving}",
        )
    wire = request.to_wire()
    for routing in ("priority", "session", "stream_tokens"):
        wire.pop(routing, None)
    return wire


def _short(text: str, most: int = 40) -> str:
    return text if len(text) <= most else text[:most] + "..."

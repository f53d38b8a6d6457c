"""OpenAI's chat and completions bodies and its error body as pydantic models, only to
document them in the gateway's /openapi.json: farm/openai/api.py reads the bodies by hand
(`request_fields`), for OpenAI's error messages naming the parameter, and
tests/test_openapi.py checks that the two agree."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from farm.openai.choices import MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS
from farm.request import MAX_DRAFT, MAX_LOGIT_BIAS, MAX_N, MAX_TOKENS_LIMIT, ResponseFormat
from farm.tools.schema import Tool, ToolChoice

# Each optional parameter is nullable: null means its default, as `request_fields` reads it.
# Bounds are farm's own (farm/request.py's Sampling and Stopping), so that a body valid here
# is not refused for a value out of range.


class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong, and what to do about it")
    type: str = Field(
        description="invalid_request_error, rate_limit_error, server_error or request_cancelled"
    )
    param: str | None = Field(description="the parameter at fault, when one is")
    code: str | None = Field(description="such as model_not_found or rate_limit_exceeded")


class ErrorBody(BaseModel):
    """Every error the gateway answers, in OpenAI's shape (`error()` makes them)."""

    error: ErrorDetail


class ChatTextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatFunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")


class ChatToolCall(BaseModel):
    """A call an earlier assistant message made (a client's extras, such as `index`, are
    allowed and dropped)."""

    id: str
    type: Literal["function"] = "function"
    function: ChatFunctionCall


class ChatMessage(BaseModel):
    """A chat message. Content is text or text parts (farm's models take text only); it is
    null only in an assistant message that calls tools."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ChatTextPart] | None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = Field(default=None, description="a tool message's call")
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class _GenerationBody(BaseModel):
    """What chat and completions bodies both take."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="one of GET /v1/models")
    stream: bool | None = Field(default=None, description="server-sent events instead of JSON")
    stream_options: StreamOptions | None = Field(default=None, description="with stream only")
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    max_time_ms: int | None = Field(default=None, gt=0, le=24 * 3600 * 1000)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    penalty_last_n: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    mirostat_mode: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = Field(default=None, gt=0.0, le=20.0)
    mirostat_eta: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    logit_bias: dict[str, float] | None = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS,
        description="token id (as a string) -> bias from -100 to 100",
    )
    draft_max: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DRAFT,
        description="prompt-lookup speculation (farm's): the most tokens drafted a step from "
        "the prompt and reply; 0: none",
    )
    response_format: ResponseFormat | None = None
    grammar: str | None = Field(default=None, description="a GBNF grammar the text must follow")
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None


class ChatBody(_GenerationBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: true only"
    )


class CompletionBody(_GenerationBody):
    """POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="a prompt, or a list of them (token ids are not taken)"
    )
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(default=None, description="1, or equal to n")
    suffix: str | None = Field(default=None, description="infill is not served: empty or null")

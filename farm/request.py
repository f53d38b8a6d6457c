"""The unit of work: one validated request that crosses the wire as plain JSON.

A request has three parts, kept apart on purpose:

- routing and accounting: `model`, `priority`, `session` (never passed to llama.cpp);
- the input: a raw `prompt`, chat `messages`, or `input` to embed (exactly one);
- generation: `sampling` (how tokens are drawn) and `stopping` (when generation ends);
  an embeddings job (`input`) generates nothing: it gives one vector per input, and
  `dimensions` shortens them where the model allows it.

Both the nested form `{"sampling": {...}, "stopping": {...}}` and the flat form
`{"temperature": 0.2, "max_tokens": 64}` are accepted; the flat one is folded into the
nested one. Unknown fields and out-of-range values are refused with a message naming the
field, before anything is queued.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from farm.errors import InvalidRequest
from farm.grammar import check_gbnf, check_json_schema
from farm.tools.schema import MAX_TOOLS, NamedToolChoice, Tool, ToolCall, ToolChoice

Priority = Literal["high", "normal", "low"]
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MODEL_NAME_RULE = "1-64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
MAX_TOKENS_LIMIT = 32768
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one embeddings request
MAX_N = 16  # sequences from one prompt
MAX_CHOICES = 64  # sequences in one job: prompts x n
MAX_LOGPROBS = 20  # alternatives per token
MAX_LOGIT_BIAS = 1024
MAX_DRAFT = 32  # tokens drafted a step by prompt-lookup speculation


def valid_text(v: str) -> str:
    """Text that UTF-8 can carry and a database column can store."""
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "is not valid Unicode text (it holds lone surrogates: bytes that were not UTF-8)"
        ) from None
    return v


Text = Annotated[str, AfterValidator(valid_text)]
# Latest accepted client clock: year 2286. Past it the value is not a timestamp.
MAX_TIMESTAMP = 10_000_000_000.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    """A chat message. An assistant's may carry the `tool_calls` it made (its content then
    may be empty); a `tool` message is a call's result, naming the call by `tool_call_id`."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _calls_without_content(cls, data: Any) -> Any:
        # OpenAI's assistant message that only calls tools has content null.
        if isinstance(data, dict) and data.get("content", "") is None and data.get("tool_calls"):
            return {**data, "content": ""}
        return data

    @model_validator(mode="after")
    def _tool_fields(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries 'tool_calls'")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a 'tool' message, and only one, names its call by 'tool_call_id'")
        return self

    def size(self) -> int:
        """Bytes of text this message gives the prompt (its calls as JSON included)."""
        calls = sum(len(c.model_dump_json()) for c in self.tool_calls or ())
        return len(self.content.encode()) + calls


class Sampling(_Strict):
    """How the next token is drawn. None means the model's default, then llama.cpp's."""

    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    penalty_last_n: int | None = Field(
        default=None, ge=0, le=MAX_TOKENS_LIMIT, description="tokens the penalties look back on"
    )
    mirostat_mode: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = Field(default=None, gt=0.0, le=20.0)
    mirostat_eta: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    logit_bias: dict[int, float] | None = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS,
        description="token id -> bias added to its logit, -100 (never) to 100 (always)",
    )
    draft_max: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DRAFT,
        description="prompt-lookup speculation: the most tokens drafted a step from the "
        "prompt and reply so far (default 8); 0: none. Drafts change no distribution",
    )

    @field_validator("logit_bias")
    @classmethod
    def _biases_in_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (v or {}).items():
            if token < 0:
                raise ValueError(f"token ids are 0 or more, not {token}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are from -100 to 100, not {bias:g} (token {token})")
        return v


class Stopping(_Strict):
    """When generation ends: whichever comes first."""

    stop: tuple[Text, ...] = Field(default=(), max_length=16)
    max_tokens: int = Field(
        default=256, ge=0, le=MAX_TOKENS_LIMIT, description="0: the prompt alone is read"
    )
    max_time_ms: int | None = Field(default=None, gt=0, le=24 * 3600 * 1000)

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v


class JsonSchema(_Strict):
    """OpenAI's `response_format.json_schema`: the schema the reply must satisfy."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _convertible(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(v)
        return v


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is given exactly when type is 'json_schema'")
        return self


class BatchLine(_Strict):
    """Which line of which batch a job runs: its outcome is written on that line."""

    id: str = Field(max_length=64)
    line: int = Field(ge=1)


# One input of an embeddings job: a text, or the model's token ids.
TokenIds = tuple[Annotated[int, Field(ge=0, le=2**31 - 1)], ...]
EmbeddingInput = Text | TokenIds


SAMPLING_FIELDS = frozenset(Sampling.model_fields)
STOPPING_FIELDS = frozenset(Stopping.model_fields)


class Request(_Strict):
    """One prompt for one model. Build it with `make_request` to get farm's error messages."""

    model: str = Field(description="registered model name")
    prompt: Text | tuple[Text, ...] | None = Field(
        default=None, description="a prompt, or several: each gets its own choices"
    )
    messages: tuple[Message, ...] | None = None
    input: tuple[EmbeddingInput, ...] | None = Field(
        default=None,
        max_length=MAX_EMBEDDING_INPUTS,
        description="texts or token arrays to embed: an embeddings job, one vector per input",
    )
    dimensions: int | None = Field(
        default=None, ge=1, le=65536, description="shorten each vector (models that allow it)"
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        default=None,
        description="how a response carries the vectors (the gateway's and batch output's "
        "concern; workers ignore it)",
    )
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices per prompt")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="report each token's logprob and this many alternatives (None: none)",
    )
    echo: bool = Field(
        default=False, description="the reply starts with the prompt (and its logprobs)"
    )
    sampling: Sampling = Sampling()
    stopping: Stopping = Stopping()
    grammar: Text | None = Field(
        default=None, max_length=100_000, description="GBNF grammar the reply must follow"
    )
    response_format: ResponseFormat | None = None
    tools: tuple[Tool, ...] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(
        default=None, description="none, auto, required or a named function; default auto"
    )
    parallel_tool_calls: bool | None = None
    priority: Priority = "normal"
    session: Text = Field(default="default", min_length=1, max_length=128)
    batch: BatchLine | None = Field(
        default=None, description="the batch line this job runs (the batch feeder sets it)"
    )
    stream_tokens: bool = Field(
        default=True, description="write each piece of text to the job's stream as it comes"
    )
    submitted_at: float | None = Field(
        default=None,
        ge=0,
        le=MAX_TIMESTAMP,
        description="client clock at submit, epoch seconds; set by submit",
    )

    @model_validator(mode="before")
    @classmethod
    def _fold_flat_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for group, names in (("sampling", SAMPLING_FIELDS), ("stopping", STOPPING_FIELDS)):
            flat = {k: data.pop(k) for k in list(data) if k in names}
            if not flat:
                continue
            nested = data.get(group) or {}
            if isinstance(nested, BaseModel):
                nested = nested.model_dump(exclude_defaults=True)
            if not isinstance(nested, dict):
                raise ValueError(
                    f"'{group}' must be an object of {group} fields, not {type(nested).__name__}"
                )
            both = sorted(set(flat) & set(nested))
            if both:
                raise ValueError(f"{', '.join(both)} given both flat and inside '{group}'")
            data[group] = {**nested, **flat}
        return data

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not MODEL_NAME_RE.match(v):
            raise ValueError(f"model names are {MODEL_NAME_RULE}")
        return v

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        # One message naming the field, not one per member of the union.
        if v is None or v in ("none", "auto", "required") or isinstance(v, NamedToolChoice):
            return v
        try:
            return NamedToolChoice.model_validate(v)
        except ValidationError:
            raise ValueError(
                "must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": NAME}}'
            ) from None

    @field_validator("grammar")
    @classmethod
    def _grammar_parses(cls, v: str | None) -> str | None:
        if v is not None:
            check_gbnf(v)  # GrammarSyntaxError is a ValueError: reported as 'grammar'
        return v

    @model_validator(mode="after")
    def _one_constraint(self) -> Request:
        if self.grammar is not None and self.response_format not in (
            None,
            ResponseFormat(type="text"),
        ):
            raise ValueError("give 'grammar' or a JSON 'response_format', not both")
        return self

    @model_validator(mode="after")
    def _one_input(self) -> Request:
        if self.input is not None:
            if self.prompt is not None or self.messages is not None:
                raise ValueError("give 'input' (to embed) or 'prompt'/'messages', not both")
            _check_embedding_inputs(self.input)
            return self
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.dimensions is not None or self.encoding_format is not None:
            raise ValueError("'dimensions' and 'encoding_format' are for embeddings ('input')")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must hold at least one message")
        if isinstance(self.prompt, tuple) and not 1 <= len(self.prompt) <= MAX_CHOICES:
            raise ValueError(f"'prompt' must hold 1 to {MAX_CHOICES} prompts")
        if any(not p for p in self.prompts) and self.prompt is not None:
            raise ValueError("'prompt' must not be empty")
        if len(self.prompts or (None,)) * self.n > MAX_CHOICES:
            raise ValueError(
                f"prompts x n is {len(self.prompts) * self.n}; one request makes at most "
                f"{MAX_CHOICES} choices"
            )
        if self.echo and self.messages is not None:
            raise ValueError("'echo' is for prompts, not chat messages")
        return self

    @model_validator(mode="after")
    def _tools_fit(self) -> Request:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("invalid 'tools': two tools have the same function name")
        choice = self.tool_choice
        if choice not in (None, "none", "auto"):
            if not names:
                raise ValueError("invalid 'tool_choice': it asks for a call but 'tools' is empty")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(
                    f"invalid 'tool_choice': function {choice.function.name!r} is not in "
                    f"'tools' ({', '.join(names)})"
                )
        if self.tools and self.prompt is not None:
            raise ValueError("invalid 'tools': tools take chat 'messages', not a 'prompt'")
        if self.calls_tools and (self.grammar is not None or self.response_format is not None):
            raise ValueError(
                "invalid 'tool_choice': give 'tools' or a 'grammar'/'response_format', not "
                "both (or set tool_choice to 'none')"
            )
        made: set[str] = set()
        for i, m in enumerate(self.messages or ()):
            made.update(c.id for c in m.tool_calls or ())
            if m.role == "tool" and m.tool_call_id not in made:
                raise ValueError(
                    f"invalid 'messages.{i}.tool_call_id': {m.tool_call_id!r} matches no call "
                    "of an earlier assistant message"
                )
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may hold tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def input_size(self) -> int:
        """Bytes of text the longest prompt is made of: a raw prompt, or the messages (their
        calls as JSON included) and the tools."""
        if self.messages is None:
            return max((len(p.encode()) for p in self.prompts), default=0)
        return sum(m.size() for m in self.messages) + self.tools_size

    @property
    def text_chars(self) -> int:
        """Characters of text the request carries in, all together: its prompts, or its
        messages (their calls as JSON) and tools, or its texts to embed (token arrays are
        held to the model's context instead)."""
        if self.input is not None:
            return sum(len(item) for item in self.input if isinstance(item, str))
        if self.messages is None:
            return sum(map(len, self.prompts))
        calls = sum(len(c.model_dump_json()) for m in self.messages for c in m.tool_calls or ())
        return sum(len(m.content) for m in self.messages) + calls + self.tools_size

    @property
    def tools_size(self) -> int:
        """Bytes of the tools as JSON: the model reads them in its prompt."""
        return sum(len(t.model_dump_json()) for t in self.tools or ())

    @property
    def prompts(self) -> tuple[str, ...]:
        """The raw prompts, one or more (none for chat messages)."""
        if self.prompt is None:
            return ()
        return self.prompt if isinstance(self.prompt, tuple) else (self.prompt,)

    @property
    def choices(self) -> int:
        """How many sequences the job runs: prompts (or the chat) x n."""
        return max(1, len(self.prompts)) * self.n

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def is_embedding(self) -> bool:
        return self.input is not None

    def to_wire(self) -> dict[str, Any]:
        """The JSON-safe dict that travels as the task's argument."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


def _check_embedding_inputs(inputs: tuple[EmbeddingInput, ...]) -> None:
    if not inputs:
        raise ValueError("'input' must hold at least one text or token array")
    for i, item in enumerate(inputs):
        if not item:
            kind = "string" if isinstance(item, str) else "token array"
            raise ValueError(f"'input' item {i} is an empty {kind}; every input needs content")


def oversized(request: Request, most: int) -> tuple[str, str] | None:
    """(the input field, why) when the request carries more than `most` characters of text
    (FARM_MAX_PROMPT_CHARS), else None. Far more than any model's context holds: refused
    before it is queued, carried through Redis and tokenised by a worker for a minute and
    more only to fail there."""
    size = request.text_chars
    if size <= most:
        return None
    field = "input" if request.is_embedding else "messages" if request.is_chat else "prompt"
    return field, (
        f"{size:,} characters of text, more than one request may carry "
        f"(FARM_MAX_PROMPT_CHARS={most:,}) and far beyond any model's context; nothing was "
        "queued: shorten it or split it into several requests"
    )


def make_request(data: dict[str, Any]) -> Request:
    """Validate `data` into a Request, or raise InvalidRequest naming each bad field."""
    try:
        return Request.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(describe_errors(e)) from e


def _shorten(text: str, most: int = 40) -> str:
    return text if len(text) <= most else text[:most] + "..."


def describe_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = _shorten(".".join(str(p) for p in err["loc"]))
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown field {loc!r}; see `farm submit --help` for the known ones")
            continue
        loc = loc or "request"
        msg = err["msg"].removeprefix("Value error, ")
        got = ""
        if err["loc"] and err["type"] != "missing" and not isinstance(err.get("input"), dict):
            shown = repr(err.get("input"))
            got = f" (got {shown[:40] + '...' if len(shown) > 40 else shown})"
        if not err["loc"]:
            # A check across fields names the field itself ("invalid 'tool_choice': ...").
            lines.append(msg if msg.startswith("invalid '") else f"invalid request: {msg}")
        else:
            lines.append(f"invalid '{loc}': {msg}{got}")
    return "; ".join(lines)

"""OpenAI's embeddings shapes, shared by the gateway (POST /v1/embeddings) and batch files
(lines with url /v1/embeddings): a request body into farm's Request fields, a finished
embeddings job into OpenAI's response.

    {"model": "gemma3-270m", "input": "text" | ["a", "b"] | [1, 2, 3] | [[1, 2], [3]],
     "encoding_format": "float" | "base64", "dimensions": 256, "user": "..."}
 -> {"object": "list", "model": ..., "data": [{"object": "embedding", "index": 0,
     "embedding": [0.1, ...] | "base64 of little-endian float32"}],
     "usage": {"prompt_tokens": N, "total_tokens": N}}

Every refusal is a BadBody naming OpenAI's parameter (`input`, `model`, `dimensions`,
`encoding_format`, ...), before anything is queued. `EmbeddingsBody` says the same shape as
a pydantic model, only for the gateway's /openapi.json.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from farm.completion import Completion, decode_vector
from farm.openai.api import BadBody, json_type
from farm.request import MAX_EMBEDDING_INPUTS

KNOWN = ("model", "input", "encoding_format", "dimensions", "user")
ENCODINGS = ("float", "base64")


# OpenAI's four forms of `input`, as `embedding_inputs` takes them.
_Token = Annotated[int, Field(ge=0, le=2**31 - 1)]
_Tokens = Annotated[list[_Token], Field(min_length=1)]
_Many = Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
_Inputs = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], _Many]
    | Annotated[list[_Token], _Many]
    | Annotated[list[_Tokens], _Many]
)


class EmbeddingsBody(BaseModel):
    """POST /v1/embeddings (documented; `embedding_fields` reads it)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="one of GET /v1/models; it must serve embeddings")
    input: _Inputs = Field(
        description="a text, texts, one array of token ids, or arrays of token ids"
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=2**31 - 1)
    user: str | None = None


def _is_token(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31


def _token_array(value: list[Any], where: str) -> list[int]:
    if not value:
        raise BadBody(f"invalid 'input': {where} is an empty token array", "input")
    if not all(_is_token(t) for t in value):
        raise BadBody(
            f"invalid 'input': {where} must hold token ids, integers from 0 to 2^31-1", "input"
        )
    return value


def embedding_inputs(value: Any) -> list[str | list[int]]:
    """OpenAI's four forms of `input` as a list of texts or token arrays (BadBody naming
    `input` for anything else: an empty string, an empty list, over 2,048 inputs, another
    type)."""
    if isinstance(value, str):
        if not value:
            raise BadBody("invalid 'input': the string is empty; give text to embed", "input")
        return [value]
    if not isinstance(value, list):
        raise BadBody(
            "invalid 'input': must be a string, an array of strings, an array of token ids "
            f"or an array of token arrays, not {json_type(value)}",
            "input",
        )
    if not value:
        raise BadBody("invalid 'input': the array is empty; give at least one input", "input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise BadBody(
            f"invalid 'input': {len(value):,} inputs; at most {MAX_EMBEDDING_INPUTS:,} per request",
            "input",
        )
    if all(_is_token(v) for v in value):  # one token array
        return [value]
    items: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise BadBody(f"invalid 'input': input[{i}] is an empty string", "input")
            items.append(item)
        elif isinstance(item, list):
            items.append(_token_array(item, f"input[{i}]"))
        else:
            raise BadBody(
                f"invalid 'input': input[{i}] must be a string or a token array, not "
                f"{json_type(item)}",
                "input",
            )
    return items


def embedding_fields(body: Any) -> dict[str, Any]:
    """farm.submit's fields for an embeddings body (BadBody naming the parameter)."""
    if not isinstance(body, dict):
        raise BadBody("the request body must be a JSON object")
    unknown = sorted(set(body) - set(KNOWN))
    if unknown:
        raise BadBody(f"unknown parameter '{unknown[0]}'", unknown[0])
    if not isinstance(body.get("model"), str):
        raise BadBody("'model' is required: one of GET /v1/models", "model")
    if "input" not in body:
        raise BadBody("'input' is required: the text (or texts) to embed", "input")
    fields: dict[str, Any] = {"model": body["model"], "input": embedding_inputs(body["input"])}
    encoding = body.get("encoding_format")
    if encoding is not None:
        if encoding not in ENCODINGS:
            raise BadBody(
                f"invalid 'encoding_format': must be float or base64, not {str(encoding)[:40]!r}",
                "encoding_format",
            )
        fields["encoding_format"] = encoding
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not _is_token(dimensions) or dimensions < 1:
            raise BadBody(
                f"invalid 'dimensions': must be a positive integer, not {json_type(dimensions)}",
                "dimensions",
            )
        fields["dimensions"] = dimensions
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadBody(f"invalid 'user': must be a string, not {json_type(user)}", "user")
    return fields


def embeddings_response(c: Completion, encoding_format: str | None = "float") -> dict[str, Any]:
    """OpenAI's response for a finished embeddings job: each vector as floats, or (with
    encoding_format base64) as the job carries it already, base64 of little-endian
    float32."""
    vectors = c.embeddings or []
    as_base64 = encoding_format == "base64"
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": v if as_base64 else decode_vector(v),
            }
            for i, v in enumerate(vectors)
        ],
        "model": c.model,
        "usage": {"prompt_tokens": c.usage.prompt_tokens, "total_tokens": c.usage.prompt_tokens},
    }

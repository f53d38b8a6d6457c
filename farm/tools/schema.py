"""OpenAI's tool-calling shapes, validated: function tools, the tool choice, and calls.

A tool's `parameters` must be a JSON schema (checked with `jsonschema`'s meta-schema) that
the worker's grammar converter can take (`farm.grammar.check_json_schema`). Arguments
travel as OpenAI sends them: a JSON string.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator

from farm.grammar import check_json_schema

FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FunctionDef(_Strict):
    """A function the model may call: its name, what it does, its arguments' JSON schema."""

    name: str = Field(description="a-z, A-Z, 0-9, '_' and '-', at most 64")
    description: str | None = Field(default=None, max_length=100_000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not FUNCTION_NAME_RE.match(v):
            raise ValueError("function names are 1-64 characters of a-z, A-Z, 0-9, '_' and '-'")
        return v

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(v)  # depth and $refs first: the meta-schema check recurses
        try:
            jsonschema.validators.validator_for(v).check_schema(v)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.path)
            raise ValueError(
                f"not a valid JSON schema: {e.message}" + (f" (at '{where}')" if where else "")
            ) from None
        return v


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """`{"type": "function", "function": {"name": ...}}`: call this function."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")

    def parsed_arguments(self) -> Any:
        """The arguments as JSON values (the string itself when it is not JSON)."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments


class ToolCall(_Strict):
    """A call the model made (in a reply) or made earlier (in an assistant message)."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(_Strict):
    """A piece of a call as it streams: first index, id and name (arguments ""), then pieces
    of its arguments under the same index."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

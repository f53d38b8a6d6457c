"""A request's output constraint as a GBNF grammar for llama.cpp's grammar sampler.

`grammar` is used as given; `response_format` `json_object` is llama-cpp-python's JSON
grammar, and `json_schema` is converted by llama-cpp-python's schema converter.
"""

from __future__ import annotations

import json

from farm.errors import JobFailed
from farm.request import Request


def request_grammar(request: Request) -> str | None:
    if request.grammar is not None:
        return request.grammar
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if fmt.type == "json_object" or fmt.json_schema is None:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json.dumps(fmt.json_schema.schema_))
    except Exception as e:  # the converter raises plain Exceptions for unsupported schemas
        raise JobFailed(
            f"invalid 'response_format': the JSON schema cannot be turned into a grammar: {e}"
        ) from e

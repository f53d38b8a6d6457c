"""What the gateway's /openapi.json says beyond what FastAPI infers from its routes.

The routes read their bodies by hand (farm/openai/api.py and its siblings) so that every
refusal is OpenAI's error naming the parameter; FastAPI therefore sees no request body and
no error. Each route says them here instead:

    @app.post(path, openapi_extra=request_body(ChatBody), responses=errors(400, 401, ...))

`request_body` documents a request body from the pydantic model kept beside the code that reads
it; `errors` the statuses a route can answer, each in OpenAI's error shape (ErrorBody);
`install` moves the body models' schemas into the document's components and puts the
`x-request-id` header (farm/gateway/access.py) on every response.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from farm.openai.shapes import ErrorBody

REF = "#/components/schemas/{model}"

# What each status means on this gateway (farm/openai/api.py's `error` decides them).
STATUSES = {
    400: "the body or a parameter is not what the route takes; `param` names it",
    401: "a missing, unknown or revoked API key (farm/gateway/keys.py)",
    403: "the key is not an admin key (`farm keys create --admin`)",
    404: "no such model, file, batch or response (`param` says which parameter named it)",
    413: "the body is over FARM_GATEWAY_MAX_BODY",
    429: "the model's queue is full, or a quota or rate limit is reached (retry-after says "
    "when to retry)",
    503: "the gateway listens beyond loopback with no live key, no worker serves the model, "
    "or the farm's Redis or registry is away",
}
REQUEST_ID = {
    "description": "the job the request made, else the caller's own x-request-id, else a new id",
    "schema": {"type": "string"},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that answers `statuses`; any other error (a 500) is the
    default, in the same shape."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": STATUSES[status]} for status in statuses
    }
    out["default"] = {"model": ErrorBody, "description": "any other error: the gateway's log"}
    return out


def request_body(model: type[BaseModel], media_type: str = "application/json") -> dict[str, Any]:
    """`openapi_extra=` documenting a required request body of `model`'s shape. The model's
    own schema and those it nests ride along under `$defs` until `install` moves them."""
    schema = model.model_json_schema(ref_template=REF)
    defs = {**schema.pop("$defs", {}), model.__name__: schema}
    ref = {"$ref": REF.format(model=model.__name__), "$defs": defs}
    return {"requestBody": {"required": True, "content": {media_type: {"schema": ref}}}}


def streamed(description: str) -> dict[str, Any]:
    """A 200 that is JSON, or server-sent events when the body asks for `stream`."""
    return {
        "description": description,
        "content": {
            "application/json": {},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }


def install(app: FastAPI) -> None:
    """Make `app.openapi()` finish what `request_body` and the routes began."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for operations in document["paths"].values():
            for operation in operations.values():
                if "requestBody" in operation:
                    # A copy: FastAPI put the route's own openapi_extra here, kept whole.
                    operation["requestBody"] = copy.deepcopy(operation["requestBody"])
                for media in operation.get("requestBody", {}).get("content", {}).values():
                    for name, schema in media["schema"].pop("$defs", {}).items():
                        if schemas.setdefault(name, schema) != schema:
                            raise ValueError(f"two different schemas are named {name!r}")
                for response in operation["responses"].values():
                    response.setdefault("headers", {})["x-request-id"] = REQUEST_ID
        return document

    app.openapi = openapi  # type: ignore[method-assign]

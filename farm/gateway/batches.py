"""OpenAI's Files and Batches endpoints, on farm's batches (farm/batches/).

    POST /v1/files                      upload a batch input file (multipart: file, purpose)
    GET  /v1/files, /v1/files/{id}      list, retrieve
    GET  /v1/files/{id}/content         an uploaded file, or a batch's output or error file
    DELETE /v1/files/{id}
    POST /v1/batches                    input_file_id, endpoint, completion_window, metadata
    GET  /v1/batches, /v1/batches/{id}  list (limit, after), retrieve
    POST /v1/batches/{id}/cancel

A batch belongs to the session of the key that made it; other keys do not see it. Its
priority comes from X-Farm-Priority (default low). Creating a batch again from the same
file and endpoint returns the first one: a retried request never queues a file twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal, get_args

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

import farm.batches as batches
from farm.batches import store
from farm.batches.lines import MAX_BYTES
from farm.context import get_context
from farm.errors import UnknownBatch
from farm.gateway import openapi
from farm.gateway.edge import read_body
from farm.openai.api import BadBody, parse_body
from farm.registry import transaction
from farm.registry.tables import as_utc
from farm.request import valid_text

OUTPUT_SUFFIXES = {"-output": False, "-errors": True}
# An id in a path or query: text a database can look up (a NUL is a 400, not a 500 on
# PostgreSQL).
Id = Annotated[str, AfterValidator(valid_text)]
Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
ENDPOINTS: tuple[str, ...] = get_args(Endpoint)
# Refusals that every route of a session's files and batches can give.
OWN = (400, 401, 404, 503)


class FileUpload(BaseModel):
    """POST /v1/files, as multipart/form-data (documented; `upload` reads it)."""

    file: bytes = Field(
        description=f"the JSONL file, one request per line, at most {MAX_BYTES:,} bytes"
    )
    purpose: Literal["batch"]


class BatchBody(BaseModel):
    """POST /v1/batches (documented; `_create` reads it)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="the id POST /v1/files gave")
    endpoint: Endpoint = Field(description="the url every line of the file names")
    completion_window: str = Field(
        default="24h", pattern=r"^\s*[0-9]+[mhd]\s*$", description="1m to 30d, such as 24h"
    )
    metadata: dict[str, str] | None = None


class FileObject(BaseModel):
    """OpenAI's file object, as `_file_json` makes it."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"]


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


def _text(value: Any, param: str) -> str:
    """`value` as text a database can store, or BadBody naming `param`."""
    try:
        return valid_text(value)
    except ValueError as e:
        raise BadBody(f"invalid '{param}': {e}", param) from None


def add_routes(
    app: FastAPI,
    session_of: Callable[[Request], str],
    session_async: Callable[[Request], Awaitable[str]],
) -> None:
    """The routes; `session_of` checks the request's key on a thread (the sync routes run
    on one), `session_async` from the event loop."""

    @app.post(
        "/v1/files",
        openapi_extra=openapi.request_body(FileUpload, "multipart/form-data"),
        response_model=None,
        responses={200: {"model": FileObject}, **openapi.errors(400, 401, 503)},
    )
    async def upload(request: Request) -> dict[str, Any]:
        session = await session_async(request)  # the key before the file
        try:
            form = await request.form()
        except Exception:  # not multipart: python-multipart's own error is for developers
            raise BadBody(
                "send the file as multipart/form-data with 'file' and 'purpose'"
            ) from None
        upload = form.get("file")
        purpose = form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise BadBody("'file' is required: the JSONL file, as a multipart file", "file")
        if purpose != "batch":
            raise BadBody("'purpose' must be 'batch' (the only files farm takes)", "purpose")
        content = await upload.read(MAX_BYTES + 1)
        if len(content) > MAX_BYTES:
            raise BadBody(f"the file is over {MAX_BYTES // 2**20} MiB: split it", "file")
        filename = _text(upload.filename or "upload.jsonl", "file")
        return await run_in_threadpool(_save, session, filename, content)

    @app.get(
        "/v1/files",
        response_model=None,
        responses={200: {"model": FileList}, **openapi.errors(401, 503)},
    )
    def files(request: Request) -> dict[str, Any]:
        session = session_of(request)
        with _registry() as s:
            found = [_file_json(f) for f in store.list_files(s, session=session)]
        return {"object": "list", "data": found, "has_more": False}

    @app.get(
        "/v1/files/{file_id}",
        response_model=None,
        responses={200: {"model": FileObject}, **openapi.errors(*OWN)},
    )
    def file(request: Request, file_id: Id) -> dict[str, Any]:
        session = session_of(request)
        produced = _produced(file_id, session)
        if produced is not None:
            batch, failed = produced
            size = sum(len(t.encode()) for t in _lines(batch.id, failed, session))  # streamed
            return {
                "id": file_id,
                "object": "file",
                "bytes": size,
                "created_at": int(batch.created_at.timestamp()),
                "filename": f"{batch.id}_{'errors' if failed else 'output'}.jsonl",
                "purpose": "batch_output",
                "status": "processed",
            }
        with _registry() as s:
            return _file_json(store.get_file(s, file_id, session=session))

    @app.get(
        "/v1/files/{file_id}/content",
        response_class=Response,  # each return is a Response of its own: JSONL, never JSON
        responses={
            200: {"description": "the file's lines", "content": {"application/jsonl": {}}},
            **openapi.errors(*OWN),
        },
    )
    def content(request: Request, file_id: Id) -> Response:
        session = session_of(request)
        produced = _produced(file_id, session)
        if produced is not None:
            batch, failed = produced
            return StreamingResponse(
                _lines(batch.id, failed, session), media_type="application/jsonl"
            )
        with _registry() as s:
            record = store.get_file(s, file_id, session=session)
            return Response(record.content, media_type="application/jsonl")

    @app.delete(
        "/v1/files/{file_id}",
        response_model=None,
        responses={200: {"model": FileDeleted}, **openapi.errors(*OWN)},
    )
    def delete(request: Request, file_id: Id) -> dict[str, Any]:
        session = session_of(request)
        with _registry() as s:
            s.delete(store.get_file(s, file_id, session=session))
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post(
        "/v1/batches",
        openapi_extra=openapi.request_body(BatchBody),
        responses=openapi.errors(400, 401, 404, 413, 503),
    )
    async def create(request: Request) -> dict[str, Any]:
        session = await session_async(request)  # the key before the body
        body = parse_body(await read_body(request))
        return await run_in_threadpool(_create, request, session, body)

    def _create(request: Request, session: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadBody("the request body must be a JSON object")
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"})
        if unknown:
            raise BadBody(f"unknown parameter '{unknown[0]}'", unknown[0])
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise BadBody(
                "'input_file_id' is required: the id POST /v1/files gave", "input_file_id"
            )
        _text(file_id, "input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise BadBody(
                "'endpoint' must be /v1/chat/completions, /v1/completions or /v1/embeddings",
                "endpoint",
            )
        window = body.get("completion_window", "24h")
        if not isinstance(window, str):
            raise BadBody("'completion_window' must be a string such as 24h", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise BadBody("'metadata' must be an object of strings", "metadata")
        for k, v in (metadata or {}).items():
            _text(k, "metadata")
            _text(v, f"metadata.{k}")
        priority = request.headers.get("x-farm-priority", "low")
        with _registry() as s:
            upload = store.get_file(s, file_id, session=session)
            content, filename = upload.content, upload.filename
        batch, _ = batches.submit(
            content,
            name=f"{file_id}:{endpoint.strip('/').replace('/', '.')}",
            session=session,
            priority=priority,
            completion_window=window,
            input_file_id=file_id,
            metadata=metadata,
            endpoint=endpoint,
            source=filename,
        )
        return batch.to_json()

    @app.get("/v1/batches", responses=openapi.errors(400, 401, 503))
    def listing(request: Request, limit: int = 20, after: Id | None = None) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise BadBody("'limit' must be from 1 to 100", "limit")
        found = batches.listing(session=session_of(request), limit=limit + 1, after=after)
        data = [b.to_json() for b in found[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(found) > limit,
        }

    @app.get("/v1/batches/{batch_id}", responses=openapi.errors(*OWN))
    def retrieve(request: Request, batch_id: Id) -> dict[str, Any]:
        return batches.get(batch_id, session=session_of(request)).to_json()

    @app.post("/v1/batches/{batch_id}/cancel", responses=openapi.errors(*OWN))
    def cancel(request: Request, batch_id: Id) -> dict[str, Any]:
        return batches.cancel(batch_id, session=session_of(request)).to_json()


def _registry() -> Any:
    return transaction(get_context().database_url)


def _save(session: str, filename: str, content: bytes) -> dict[str, Any]:

    if not content.strip():
        raise BadBody("the file is empty: one JSON request per line", "file")
    with _registry() as s:
        return _file_json(
            store.save_file(s, session=session, filename=filename, purpose="batch", content=content)
        )


def _file_json(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.size_bytes,
        "created_at": int(as_utc(record.created_at).timestamp()),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
    }


def _produced(file_id: str, session: str) -> tuple[Any, bool] | None:
    """A batch's output or error file: (the batch, whether it is the error file)."""
    for suffix, failed in OUTPUT_SUFFIXES.items():
        if file_id.startswith("file-batch_") and file_id.endswith(suffix):
            batch_id = file_id.removeprefix("file-").removesuffix(suffix)
            batch = batches.get(batch_id, session=session)
            if (batch.error_file_id if failed else batch.output_file_id) != file_id:
                raise UnknownBatch(f"no file '{file_id}' (yet): batch {batch.id} is {batch.status}")
            return batch, failed
    return None


def _lines(batch_id: str, failed: bool, session: str) -> Iterator[str]:
    return batches.results(batch_id, failed=failed, session=session)

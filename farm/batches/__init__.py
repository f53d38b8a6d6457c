"""Batch jobs: a file of requests run in the background, for cron and for /v1/batches.

    farm batch submit FILE / POST /v1/batches
      -> lines.check: every line checked, `LINE: field: reason`, nothing queued if one is bad
      -> store.create: the batch and its lines in the registry, all pending (idempotent:
         the same --name, or the same file without one, gives back the existing batch)
      -> feeder: tops each model's queue up to FARM_BATCH_WINDOW lines, at the batch's
         priority (low by default), so interactive jobs go first and Redis stays small
      -> worker: runs each line as a job; its outcome is written on the line, once
      -> output: the results and errors files, OpenAI's batch output format

`submit`, `get`, `listing`, `cancel` and `results` are what the CLI and the gateway call.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from farm.batches import lines, store
from farm.batches.output import jsonl
from farm.batches.store import Batch
from farm.context import FarmContext, get_context
from farm.errors import InvalidRequest
from farm.queue import PRIORITIES
from farm.registry import queries, transaction
from farm.registry.tables import BatchLineRecord
from farm.request import make_request

__all__ = ["Batch", "cancel", "get", "listing", "results", "submit"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")


def submit(
    file: str | Path | bytes,
    *,
    name: str | None = None,
    session: str = "default",
    priority: str = "low",
    completion_window: str = store.DEFAULT_WINDOW,
    input_file_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    endpoint: str | None = None,
    source: str | None = None,
    ctx: FarmContext | None = None,
) -> tuple[Batch, bool]:
    """Create a batch from a JSONL file (a path, or its bytes); returns it and whether it
    is new. A batch with the same name (default: the file's SHA-256) is returned as it is,
    and nothing is queued again. BatchFileError lists the bad lines; nothing is created.
    `endpoint`: every line's url must be it (OpenAI's rule for /v1/batches)."""
    ctx = ctx or get_context()
    if isinstance(file, bytes):
        content, shown = file, source or "the batch file"
    else:
        path = Path(file)
        try:
            content = path.read_bytes()
        except OSError as e:
            raise InvalidRequest(f"cannot read the batch file {path}: {e.strerror}") from None
        shown = str(path)
    if priority not in PRIORITIES:
        raise InvalidRequest(f"invalid 'priority': {priority!r}; give high, normal or low")
    window_s = store.window_seconds(completion_window)
    digest = lines.content_hash(content)
    if name is None:  # the same file from the same session is the same batch
        owned = session.encode() + b"\0" + content
        name = f"sha256-{lines.content_hash(owned)[:32]}"
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid batch name {name!r}: 1-128 letters, digits and . _ : @ + -, starting "
            "with a letter or digit"
        )
    make_request({"model": "m", "prompt": "p", "session": session})  # a valid session
    with transaction(ctx.database_url) as s:
        existing = store.find_by_name(s, name)
        if existing is not None:
            _check_owner(existing.session, session, name)
            return store.get(s, existing.id), False
        found = [m for m in queries.list_models(s) if m.enabled]
        models = {m.name: m.n_ctx for m in found}
        embedders = frozenset(m.name for m in found if m.embedding)
    checked = lines.check(
        content,
        models,
        source=shown,
        endpoint=endpoint,
        embedders=embedders,
        max_chars=ctx.settings.max_prompt_chars,
    )
    try:
        with transaction(ctx.database_url) as s:
            record = store.create(
                s,
                lines=checked,
                name=name,
                session=session,
                priority=priority,
                content_hash=digest,
                window_s=window_s,
                input_file_id=input_file_id,
                meta=metadata,
            )
            batch_id = record.id
    except store.NameTaken:  # the same name created at the same moment elsewhere
        with transaction(ctx.database_url) as s:
            existing = store.find_by_name(s, name)
            if existing is None:
                raise
            _check_owner(existing.session, session, name)
            return store.get(s, existing.id), False
    with transaction(ctx.database_url) as s:
        return store.get(s, batch_id), True


def _check_owner(owner: str, session: str, name: str) -> None:
    if owner != session:
        raise InvalidRequest(
            f"the batch name '{name}' is taken by another session's batch; choose another --name"
        )


def get(batch_id: str, *, session: str | None = None, ctx: FarmContext | None = None) -> Batch:
    """The batch by id (or name), with its lines counted."""
    ctx = ctx or get_context()
    with transaction(ctx.database_url) as s:
        return store.get(s, batch_id, session=session)


def listing(
    *,
    session: str | None = None,
    limit: int = 20,
    after: str | None = None,
    ctx: FarmContext | None = None,
) -> list[Batch]:
    ctx = ctx or get_context()
    with transaction(ctx.database_url) as s:
        return store.listing(s, session=session, limit=limit, after=after)


def cancel(batch_id: str, *, session: str | None = None, ctx: FarmContext | None = None) -> Batch:
    """Cancel: lines not started never run; ended ones are kept (the feeder does the rest)."""
    ctx = ctx or get_context()
    with transaction(ctx.database_url) as s:
        return store.request_cancel(s, batch_id, session=session)


def results(
    batch_id: str,
    *,
    failed: bool = False,
    session: str | None = None,
    ctx: FarmContext | None = None,
) -> Iterator[str]:
    """The output file's lines (or, `failed`, the error file's) as JSONL text."""
    ctx = ctx or get_context()
    with transaction(ctx.database_url) as s:
        batch = store.get(s, batch_id, session=session)

    def ended() -> Iterator[BatchLineRecord]:
        # A transaction per page: the reader (a slow client, a pager) may take its time
        # without holding a transaction open, which PostgreSQL ends after 30 s idle.
        after = 0
        while True:
            with transaction(ctx.database_url) as s:
                page = store.ended_page(s, batch.id, failed=failed, after=after)
            yield from page
            if len(page) < store.PAGE:
                return
            after = page[-1].line

    yield from jsonl(ended(), failed=failed)

"""Stored responses (the gateway's /v1/responses): named queries on the `responses` table,
each scoped to the session that owns the response. Each takes the caller's session and none
commits."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from farm.registry.tables import ResponseRecord


def add(
    s: Session, *, id: str, session: str, conversation: list[Any], response: dict[str, Any]
) -> None:
    """Store a response and the conversation it ends, for `session`."""
    s.add(ResponseRecord(id=id, session=session, conversation=conversation, response=response))


def get(s: Session, id: str, session: str) -> ResponseRecord | None:
    """The response `id` of `session`; None if there is none, or it is another session's."""
    return s.scalar(
        select(ResponseRecord).where(ResponseRecord.id == id, ResponseRecord.session == session)
    )


def remove(s: Session, id: str, session: str) -> bool:
    """Delete the response `id` of `session`; whether there was one."""
    done = s.execute(
        delete(ResponseRecord).where(ResponseRecord.id == id, ResponseRecord.session == session)
    )
    return bool(getattr(done, "rowcount", 0))

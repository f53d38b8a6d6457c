"""`farm quota set|list|remove`: per-session limits on tokens per day, jobs in flight, and
requests and tokens per minute (rate limits; a session is an API key's), and a session's
weight in fair share (farm/fair/)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from farm.cli.base import _db_url, _db_url_for_writes, app, fold_table, friendly, out

quota_app = typer.Typer(
    help="Per-session quotas: tokens per day, jobs queued or running, requests and tokens "
    "per minute; and a session's weight in fair share."
)
app.add_typer(quota_app, name="quota", no_args_is_help=True)


@quota_app.command("set")
@friendly
def quota_set(
    session: Annotated[str, typer.Argument(metavar="SESSION", help="the session to limit")],
    tokens_per_day: Annotated[
        int | None,
        typer.Option(metavar="N", min=1, help="prompt and completion tokens per UTC day"),
    ] = None,
    max_queued: Annotated[
        int | None, typer.Option(metavar="N", min=1, help="jobs queued or running at once")
    ] = None,
    requests_per_minute: Annotated[
        int | None,
        typer.Option(
            "--requests-per-minute",
            "--rpm",
            metavar="N",
            min=0,
            help="submits in any minute (0 removes the limit)",
        ),
    ] = None,
    tokens_per_minute: Annotated[
        int | None,
        typer.Option(
            "--tokens-per-minute",
            "--tpm",
            metavar="N",
            min=0,
            help="prompt (about 4 characters a token) and max_tokens in any minute (0 removes)",
        ),
    ] = None,
    weight: Annotated[
        float | None,
        typer.Option(
            metavar="W",
            min=0.01,
            max=1000,
            help="fair share: while sessions are backlogged at one priority, each gets tokens "
            "in proportion to its weight (default 1; 2: twice the share)",
        ),
    ] = None,
) -> None:
    """Set (or change) a session's limits; a submit over them is refused before queuing
    (over a rate limit, with the seconds to wait: 429 and Retry-After at the gateway)."""
    from farm.errors import InvalidRequest
    from farm.registry import queries, transaction
    from farm.request import Request

    given = (tokens_per_day, max_queued, requests_per_minute, tokens_per_minute, weight)
    if all(v is None for v in given):
        raise InvalidRequest(
            "give one or more of --tokens-per-day N, --max-queued N, --requests-per-minute N, "
            "--tokens-per-minute N and --weight W"
        )
    Request.model_validate({"model": "m", "prompt": "p", "session": session})  # a valid name
    with transaction(_db_url_for_writes()) as s:
        queries.set_quota(
            s,
            session,
            tokens_per_day=tokens_per_day,
            max_queued=max_queued,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            weight=weight,
        )  # fmt: skip
    out.print(f"quota for session '{session}' set", highlight=False)


@quota_app.command("list")
@friendly
def quota_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every session's limits, tokens used today and reserved now, and jobs in flight."""
    from farm.admission.quotas import resets_at, standing
    from farm.context import get_context
    from farm.registry import queries, transaction

    with transaction(_db_url()) as s:
        rows = queries.list_quotas(s)
        found: list[dict[str, Any]] = [
            {
                "session": r.session,
                "tokens_per_day": r.tokens_per_day,
                "max_queued": r.max_queued,
                "requests_per_minute": r.requests_per_minute,
                "tokens_per_minute": r.tokens_per_minute,
                "weight": r.weight or 1.0,
            }
            for r in rows
        ]
    ctx = get_context()
    for q in found:
        q.update(standing(ctx, q["session"]))
        q["resets_at"] = resets_at().isoformat()
    if as_json:
        print(json.dumps(found, indent=2))
        return
    if not found:
        out.print("no quotas set; every session is unlimited (`farm quota set SESSION ...`)")
        return
    table = fold_table(
        "session",
        "tokens/day",
        "used today",
        "reserved",
        "max queued",
        "in flight",
        "req/min",
        "tokens/min",
        "weight",
        whole=("session",),
    )
    for q in found:
        table.add_row(
            q["session"],
            str(q["tokens_per_day"] or "-"),
            str(q["used_today"]),
            str(q["reserved"]),
            str(q["max_queued"] or "-"),
            str(q["in_flight"]),
            str(q["requests_per_minute"] or "-"),
            str(q["tokens_per_minute"] or "-"),
            f"{q['weight']:g}",
        )
    out.print(table)


@quota_app.command("remove")
@friendly
def quota_remove(session: Annotated[str, typer.Argument(metavar="SESSION")]) -> None:
    """Remove a session's limits (it becomes unlimited)."""
    from farm.errors import InvalidRequest
    from farm.registry import queries, transaction

    with transaction(_db_url()) as s:
        if not queries.remove_quota(s, session):
            raise InvalidRequest(
                f"session '{session}' has no quota; `farm quota list` shows those that do"
            )
    out.print(f"quota for session '{session}' removed", highlight=False)

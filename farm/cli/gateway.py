"""`farm serve` (the OpenAI-compatible gateway) and `farm keys create|list|revoke`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from farm.cli.base import _db_url, _db_url_for_writes, app, fold_table, friendly, out

keys_app = typer.Typer(help="API keys for the gateway; each maps to a session.")
app.add_typer(keys_app, name="keys", no_args_is_help=True)

LOCAL = ("127.0.0.1", "localhost", "::1")


@app.command()
@friendly
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    feeder: Annotated[bool, typer.Option(help="run the batch feeder in this process too")] = True,
) -> None:
    """The OpenAI-compatible HTTP API (base URL http://HOST:PORT/v1), and the batch feeder."""
    import uvicorn

    from farm.batches.feeder import start_feeder
    from farm.context import get_context
    from farm.errors import ConfigError
    from farm.gateway.app import create_app
    from farm.registry import keys, transaction

    with transaction(get_context().database_url) as s:
        protected = keys.any_live(s)
    if host not in LOCAL and not protected:
        raise ConfigError(
            f"refusing to serve on {host} without API keys: anyone could use the farm; "
            "create one with `farm keys create --session NAME` first, or serve on 127.0.0.1"
        )
    stop = start_feeder()[1] if feeder else None
    try:
        uvicorn.run(
            create_app(exposed=host not in LOCAL), host=host, port=port, log_level="warning"
        )
    finally:
        if stop is not None:
            stop.set()


def start_gateway(port: int) -> Any:
    """The gateway on 127.0.0.1:PORT in a thread of this process (for `farm up`); returns
    the uvicorn server (set `should_exit` to stop it), or None when the port is taken."""
    import socket
    import threading

    import uvicorn

    from farm.gateway.app import create_app

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return None
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, name="farm-gateway", daemon=True).start()
    return server


@keys_app.command("create")
@friendly
def keys_create(
    session: Annotated[str, typer.Option(metavar="NAME", help="the session its usage goes to")],
) -> None:
    """Make a key; it is printed once, and only its hash is kept."""
    from farm.gateway import keys
    from farm.registry import transaction
    from farm.request import Request

    Request.model_validate({"model": "m", "prompt": "p", "session": session})  # a valid name
    with transaction(_db_url_for_writes()) as s:
        key = keys.create(s, session)
    print(key)


@keys_app.command("list")
@friendly
def keys_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Keys by their first characters, with their session and state."""
    from farm.registry import keys, transaction

    with transaction(_db_url()) as s:
        rows: list[dict[str, str]] = [
            {
                "prefix": r.prefix,
                "session": r.session,
                "created": r.created_at.isoformat(),
                "revoked": r.revoked_at.isoformat() if r.revoked_at else "",
            }
            for r in keys.listing(s)
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = fold_table("key", "session", "created", "revoked", whole=("key", "session"))
    for r in rows:
        table.add_row(r["prefix"] + "…", r["session"], r["created"], r["revoked"] or "-")
    out.print(table)


@keys_app.command("revoke")
@friendly
def keys_revoke(
    prefix: Annotated[
        str, typer.Argument(metavar="KEY", help="the key, or its first 12 characters")
    ],
) -> None:
    """Revoke a key: it is refused from the next request on."""
    from farm.errors import InvalidRequest
    from farm.registry import keys, transaction

    with transaction(_db_url()) as s:
        if not keys.revoke(s, prefix):
            raise InvalidRequest(f"no live key starts with '{prefix[:12]}'; see `farm keys list`")
    out.print("revoked", highlight=False)

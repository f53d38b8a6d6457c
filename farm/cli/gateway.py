"""`farm serve` (the OpenAI-compatible gateway) and `farm keys create|list|revoke`."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
from typing import Annotated, Any

import typer

from farm.cli.base import _db_url, _db_url_for_writes, app, err, fold_table, friendly, out

keys_app = typer.Typer(help="API keys for the gateway; each maps to a session.")
app.add_typer(keys_app, name="keys", no_args_is_help=True)

LOCAL = ("127.0.0.1", "localhost", "::1")
FEEDER_STOP_WAIT_S = 5.0  # a stopping `farm serve` waits this long for its feeder's pass


@app.command()
@friendly
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    feeder: Annotated[bool, typer.Option(help="run the batch feeder in this process too")] = True,
    socket_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    supervisor_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    quiet: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """The OpenAI-compatible HTTP API (base URL http://HOST:PORT/v1), and the batch feeder.

    Beside a `farm up` on this machine, it follows that farm when it restarts elsewhere
    (its broker on another port): no need to restart `farm serve`. After a load, once idle,
    it moves to a fresh process on the same port to give back what the load's peak took
    (FARM_GATEWAY_RECYCLE_GROWTH; farm/gateway/supervisor.py)."""
    from farm.config import get_settings
    from farm.gateway.recycle import rss_bytes

    settings = get_settings()
    protected = keys_exist()
    if socket_fd is None:
        if host not in LOCAL and not live_key_exists():
            from farm.errors import ConfigError

            raise ConfigError(
                f"refusing to serve on {host} without API keys: anyone could use the farm; "
                "create one with `farm keys create --session NAME` first, or serve on 127.0.0.1"
            )
        sock = listen(host, port)
        if settings.gateway_recycle_growth > 0 and rss_bytes() is not None:
            _supervise(sock, host, port, feeder)  # this process becomes the supervisor
    else:  # a child of the supervisor: its socket, already bound
        sock = socket.socket(fileno=socket_fd)
        sock.set_inheritable(False)  # nothing this process starts holds the port
    watch = None
    if supervisor_fd is not None:
        os.set_inheritable(supervisor_fd, False)
        watch = (supervisor_fd, settings.gateway_recycle_growth, settings.gateway_recycle_idle)
    feeding = _Feeding(enabled=feeder)
    following = None
    if not settings.broker_url:  # the broker is the one `farm up` runs here
        following = _follow_farm_up(feeding)
    feeding.start()
    url = base_url(host, port)

    def ready() -> None:
        if not quiet:
            err.print(f"farm serve ready: {url} ({key_note(protected)})", highlight=False)

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _log_access_to_stderr()
        gateway_server(ready, exposed=host not in LOCAL, watch=watch).run(sockets=[sock])
    except _Terminated:
        pass
    finally:
        if following is not None:
            following()
        feeding.stop()
        sock.close()
    if _Terminated.caught:  # end by the signal, as a process that SIGTERM ends does
        os.kill(os.getpid(), signal.SIGTERM)


class _Terminated(BaseException):
    """SIGTERM, raised in `farm serve`'s main thread so that its cleanup runs (the feeder
    gives back its Redis lock). uvicorn takes SIGTERM while it serves, shuts down, and then
    raises the signal again, which comes here."""

    caught = False


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    _Terminated.caught = True
    raise _Terminated


def _supervise(sock: socket.socket, host: str, port: int, feeder: bool) -> None:
    """Become `farm serve`'s supervisor (same pid, a fresh interpreter that imports nothing
    of the gateway: it stays small), holding `sock`; it runs this command again as its
    child on that socket. Never returns."""
    os.set_inheritable(sock.fileno(), True)
    child = [sys.executable, "-m", "farm.cli", "serve", "--host", host, "--port", str(port)]
    child.append("--feeder" if feeder else "--no-feeder")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(
        sys.executable,
        [sys.executable, "-m", "farm.gateway.supervisor", "--fd", str(sock.fileno()), "--", *child],
    )


def _key_check() -> Any:
    """The gateway's key rule (farm/gateway/keys.py) for this farm, read once."""
    from farm.config import get_settings
    from farm.context import get_context
    from farm.gateway.keys import KeyCheck

    url = get_context().database_url
    return KeyCheck(lambda: url, required=get_settings().gateway_require_keys, exposed=False)


def keys_exist() -> bool:
    """Whether the farm's gateway requires an API key (one was ever created, revoked or
    not, or FARM_GATEWAY_REQUIRE_KEYS says so)."""
    return bool(_key_check().keys_required())


def live_key_exists() -> bool:
    return bool(_key_check().counts()[1] > 0)


class _Feeding:
    """`farm serve`'s batch feeder thread, restarted when the farm it feeds moves."""

    def __init__(self, *, enabled: bool):
        self.enabled = enabled
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from farm.batches.feeder import start_feeder

        if self.enabled:
            self._thread, self._stop = start_feeder()

    def stop(self) -> None:
        """Stop the feeder, and wait a little for it to end its pass and give back its lock
        (else another feeder waits for the lock to expire: LOCK_TTL_MS)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            assert self._thread is not None
            self._thread.join(FEEDER_STOP_WAIT_S)
            self._thread = None


def _follow_farm_up(feeding: _Feeding) -> Any:
    """When `farm up` here comes back on other servers, drop this process's connections
    (the next request makes new ones from farm.json) and restart the feeder on them."""
    from farm.config import masked
    from farm.context import reset_context
    from farm.local import follow

    def moved(state: dict[str, Any]) -> None:
        feeding.stop()
        reset_context()
        feeding.start()
        err.print(
            f"farm serve: following the farm `farm up` runs here, now on broker "
            f"{masked(str(state['broker_url']))}",
            highlight=False,
        )

    return follow(moved)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to HOST:PORT for the gateway, taken before anything else starts so a
    taken port is one clear error (not uvicorn's `[Errno 98]`, nor half a farm running)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Named TCP, not 0 (the default): asyncio turns Nagle's algorithm off (TCP_NODELAY) only
    # on connections whose socket says TCP, and with it on, each response's body waited
    # behind its headers for the client's delayed ACK: 40 ms on every request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from farm.errors import ConfigError

        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is taken (another `farm serve`, a `farm up`, or "
                "another server listens there): pass a free one with --port N, or stop "
                "what uses it"
            ) from e
        if e.errno == errno.EACCES:
            raise ConfigError(
                f"not allowed to listen on port {port}: ports below 1024 need root; "
                "pass --port 8000 (or another above 1023)"
            ) from e
        raise ConfigError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; pass --host an address of "
            "this machine (127.0.0.1 or 0.0.0.0)"
        ) from e
    return sock


def base_url(host: str, port: int) -> str:
    """The base URL an OpenAI client takes: http://HOST:PORT/v1."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def key_note(protected: bool) -> str:
    """What a client must send, said where the gateway tells its address."""
    if protected:
        return (
            "OpenAI-compatible; API keys required: send one as `Authorization: Bearer KEY` "
            "(OPENAI_API_KEY); make one with `farm keys create --session NAME`"
        )
    return (
        "OpenAI-compatible; no API key needed until one is made with "
        "`farm keys create --session NAME`"
    )


def _log_access_to_stderr() -> None:
    """`farm serve` prints the gateway's access log (farm/gateway/access.py): a line a
    request, without prompts."""
    import logging

    access = logging.getLogger("farm.access")
    if not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


def gateway_server(
    ready: Any, *, exposed: bool = False, watch: tuple[int, float, float] | None = None
) -> Any:
    """The gateway's uvicorn server; it calls `ready()` once it takes connections.
    `exposed`: it listens beyond loopback (then it refuses every request while no key is
    live). `watch`: it is a child of `farm serve`'s supervisor (its pipe's fd, the growth
    and the idle seconds of farm/gateway/recycle.py), told when it is ready and when it
    should be replaced."""
    import uvicorn

    from farm.gateway.app import create_app
    from farm.gateway.recycle import RecycleWatch
    from farm.gateway.server import gateway_config

    app: Any = create_app(exposed=exposed)
    recycle = RecycleWatch(app, *watch) if watch is not None else None

    class Gateway(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                ready()
                if recycle is not None:
                    recycle.start(self)

    return Gateway(gateway_config(recycle or app))


def start_gateway(sock: socket.socket, timeout: float = 30.0) -> Any:
    """The gateway on a socket from `listen`, in a thread of this process (for `farm up`);
    returns the uvicorn server (set `should_exit` to stop it) once it takes connections."""
    from farm.errors import FarmUnavailable

    ready = threading.Event()
    server = gateway_server(ready.set)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="farm-gateway", daemon=True
    )
    thread.start()
    while not ready.wait(0.05):
        if not thread.is_alive() or not (timeout := timeout - 0.05) > 0:
            raise FarmUnavailable("the gateway did not start; see the lines above")
    return server


@keys_app.command("create")
@friendly
def keys_create(
    session: Annotated[str, typer.Option(metavar="NAME", help="the session its usage goes to")],
    admin: Annotated[
        bool,
        typer.Option(
            "--admin", help="an operator's key: it may also read `farm status --gateway URL`"
        ),
    ] = False,
) -> None:
    """Make a key; it is printed once, and only its hash is kept."""
    from farm.gateway import keys
    from farm.registry import transaction
    from farm.request import Request

    Request.model_validate({"model": "m", "prompt": "p", "session": session})  # a valid name
    with transaction(_db_url_for_writes()) as s:
        key = keys.create(s, session, admin=admin)
    print(key)


@keys_app.command("list")
@friendly
def keys_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Keys by their first characters, with their session and state."""
    from farm.registry import transaction
    from farm.registry.queries import keys

    with transaction(_db_url()) as s:
        rows: list[dict[str, str]] = [
            {
                "prefix": r.prefix,
                "session": r.session,
                "created": r.created_at.isoformat(),
                "revoked": r.revoked_at.isoformat() if r.revoked_at else "",
                "admin": "yes" if r.admin else "",
            }
            for r in keys.listing(s)
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = fold_table("key", "session", "created", "revoked", "admin", whole=("key", "session"))
    for r in rows:
        table.add_row(
            r["prefix"] + "…", r["session"], r["created"], r["revoked"] or "-", r["admin"] or "-"
        )
    out.print(table)


@keys_app.command("revoke")
@friendly
def keys_revoke(
    prefix: Annotated[
        str, typer.Argument(metavar="KEY", help="the key, or its first 12 characters")
    ],
) -> None:
    """Revoke a key: it is refused from the next request on."""
    import redis

    from farm import redis_url
    from farm.context import get_context
    from farm.errors import FarmError, FarmUnavailable, InvalidRequest
    from farm.gateway import keys

    def tell() -> redis.Redis:
        ctx = get_context()
        timeout = ctx.settings.connect_timeout
        return redis_url.client(ctx.result_url, connect_timeout=timeout, socket_timeout=5)

    try:
        revoked = keys.revoke(_db_url(), prefix, tell)
    except FarmUnavailable:  # no farm here, so no gateway of it to tell now
        err.print(
            "revoked (no farm is running here to tell; a gateway that remembers the key "
            f"refuses it within {keys.CACHE_MAX_AGE:.0f} s)",
            highlight=False,
        )
        return
    except (redis.RedisError, FarmError) as e:
        err.print(
            f"revoked in the registry, but the farm's Redis could not be told ({e}), so a "
            f"gateway that remembers the key accepts it for up to {keys.CACHE_MAX_AGE:.0f} s "
            "more. Check FARM_BROKER_URL (and FARM_RESULT_URL), then run "
            f"`farm keys revoke {prefix[:12]}` again to tell the gateways now.",
            highlight=False,
        )
        raise typer.Exit(1) from e
    if revoked is None:
        raise InvalidRequest(f"no key starts with '{prefix[:12]}'; see `farm keys list`")
    out.print("revoked" if revoked else "already revoked; gateways told again", highlight=False)

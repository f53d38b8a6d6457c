"""The farm `farm up` runs on this machine, as other commands find it.

`farm up` writes `<home>/farm.json`: its pid, its broker, result store and registry, and
the port of a small HTTP server on 127.0.0.1 that answers from the farm's own process.
`farm status` asks there first: the answer needs SQLAlchemy, redis and pydantic-settings,
about half a second of imports on a small machine, which that process has loaded already.
Where there is nothing to ask (no `farm up` here, one on other servers than this shell's
FARM_BROKER_URL / FARM_RESULT_URL / FARM_DATABASE_URL name, or no answer), the command
reads the registry and broker itself, as it would without this.

Like the embedded broker and the gateway `farm up` serves on 127.0.0.1, it answers any user
of this machine; a farm shared beyond it runs on servers with passwords instead.

Standard library only: commands import this before they know they need more.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ASK_TIMEOUT_S = 2.0
STATE_FILE = "farm.json"  # in the farm's home


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "farm"


def home() -> Path:
    """FARM_HOME as the settings read it, without loading them."""
    value = _farm_env().get("FARM_HOME")
    return Path(value) if value is not None else default_home()


def _farm_env() -> dict[str, str]:
    """The FARM_* variables, named in capitals (the settings read them in any case)."""
    return {k.upper(): v for k, v in os.environ.items() if k[:5].upper() == "FARM_"}


def read_state(path: Path) -> dict[str, Any] | None:
    """The state file of a running embedded farm, or None when none runs."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid") if isinstance(state, dict) else None
    if not isinstance(pid, int) or not pid_alive(pid):
        return None
    return state


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file at once: a reader sees the old one or the new one. Created
    anew (never through a link someone left there), with the user's umask."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the running farm's side ------------------------------------------------------------------


def serve(routes: dict[str, Callable[..., Any]]) -> tuple[Callable[[], None], dict[str, Any]]:
    """Answer GET on each route with its function's result as JSON, on 127.0.0.1 and a free
    port; a route ending in "/" takes the rest of the path as its argument ("/jobs/" answers
    /jobs/ID with `f(ID)`). Returns how to stop, and what to record in the state file for
    others to ask."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote, urlsplit

    pid = str(os.getpid())

    def route(path: str) -> tuple[Callable[..., Any] | None, tuple[str, ...]]:
        if not path.endswith("/") and path in routes:
            return routes[path], ()
        prefix, _, rest = path.rpartition("/")
        return (routes.get(prefix + "/"), (unquote(rest),)) if rest else (None, ())

    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a connection that sends nothing does not hold its thread

        def do_GET(self) -> None:  # http.server's name for it
            answer, args = route(urlsplit(self.path).path)
            if answer is None:
                self._send(404, {"error": f"no route {self.path}; routes: {sorted(routes)}"})
                return
            try:
                body = answer(*args)
            except Exception as e:  # the asker reads for itself and reports it
                self._send(503, {"error": f"{type(e).__name__}: {e}"})
            else:
                self._send(200, body)

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Farm-Pid", pid)  # not a stranger that took a dead farm's port
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: `farm up`'s terminal is for the farm's own lines."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="farm-local", daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()  # refuse at once: askers fall back without waiting

    return stop, {"port": server.server_address[1]}


# -- other commands' side ---------------------------------------------------------------------


def ask(path: str, timeout: float = ASK_TIMEOUT_S) -> dict[str, Any] | None:
    """The running local farm's answer at `path` (a JSON object), or None when there is
    none to ask here: then the caller reads for itself."""
    state = read_state(home() / STATE_FILE)
    if state is None or not _same_farm(state):
        return None
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", int(state["local"]["port"]), timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200 or response.getheader("X-Farm-Pid") != str(state["pid"]):
            return None
        answer = json.loads(body)
    except Exception:  # no local entry, refused, timed out, garbled: read for yourself
        return None
    return answer if isinstance(answer, dict) else None


def _same_farm(state: dict[str, Any]) -> bool:
    """Whether this shell's settings name the running farm's servers (unset names them:
    commands use the running farm's then)."""
    env = _farm_env()
    for variable, key in (
        ("FARM_BROKER_URL", "broker_url"),
        ("FARM_RESULT_URL", "result_url"),
        ("FARM_DATABASE_URL", "database_url"),
    ):
        mine = env.get(variable)
        if mine and mine != state.get(key):
            return False
    return True


def follow(
    on_change: Callable[[dict[str, Any]], None], *, interval: float = 0.5
) -> Callable[[], None]:
    """Call `on_change(state)` from a thread whenever a `farm up` here starts on other
    servers than the ones seen last (a broker that moved to another port, a first `farm up`
    after none): a long-lived client (`farm serve`) then connects anew. A restart on the
    same servers changes nothing: their connections find them again by themselves. Returns
    how to stop following."""
    import threading

    path = home() / STATE_FILE

    def servers(state: dict[str, Any] | None) -> tuple[Any, ...] | None:
        if state is None:
            return None
        return tuple(state.get(k) for k in ("broker_url", "result_url", "database_url"))

    seen = servers(read_state(path))
    stop = threading.Event()

    def watch() -> None:
        nonlocal seen
        while not stop.wait(interval):
            state = read_state(path)
            now = servers(state)
            if state is not None and now != seen:
                try:
                    on_change(state)
                except Exception:  # the caller reports; the next round tries again
                    continue
                seen = now

    threading.Thread(target=watch, name="farm-follow", daemon=True).start()
    return stop.set

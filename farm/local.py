"""The farm `farm up` runs on this machine, as other commands find it.

`farm up` writes `<home>/farm.json` (readable by its user alone): its pid, its broker and
registry, and the port and token of a small HTTP server on 127.0.0.1 that answers from the
farm's own process. `farm status` asks there first: the answer needs SQLAlchemy, redis and
pydantic-settings, about half a second of imports on a small machine, which that process
has loaded already. Where there is nothing to ask (no `farm up` here, one on other servers
than this shell's FARM_BROKER_URL / FARM_DATABASE_URL name, or no answer), the command
reads the registry and broker itself, as it would without this.

Standard library only: commands import this before they know they need more.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ASK_TIMEOUT_S = 2.0


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
    """Replace the state file at once, readable by this user alone (it holds a token)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))
    tmp.replace(path)


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


def serve(routes: dict[str, Callable[[], Any]]) -> tuple[ThreadingHTTPServer, dict[str, Any]]:
    """Answer GET on each route with its function's result as JSON, on 127.0.0.1 and a free
    port, to requests carrying the token. Returns the server (`shutdown()` stops it) and
    what to record in the state file for other commands to ask it."""
    token = secrets.token_urlsafe(24)
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            given = self.headers.get("Authorization", "").encode()
            answer = routes.get(self.path)
            if not hmac.compare_digest(given, expected):
                self._send(401, {"error": "the token in farm.json is needed"})
            elif answer is None:
                self._send(404, {"error": f"no route {self.path}; routes: {sorted(routes)}"})
            else:
                try:
                    body = answer()
                except Exception as e:  # the asker reads for itself and reports it
                    self._send(503, {"error": f"{type(e).__name__}: {e}"})
                else:
                    self._send(200, body)

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: `farm up`'s terminal is for the farm's own lines."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="farm-local", daemon=True).start()
    return server, {"port": server.server_address[1], "token": token}


# -- other commands' side ---------------------------------------------------------------------


def ask(path: str, timeout: float = ASK_TIMEOUT_S) -> Any | None:
    """The running local farm's answer at `path`, or None when there is none to ask here:
    then the caller reads for itself."""
    state = read_state(home() / "farm.json")
    if state is None or not _same_farm(state):
        return None
    local = state.get("local")
    if not isinstance(local, dict):
        return None
    conn = http.client.HTTPConnection("127.0.0.1", int(local["port"]), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {local['token']}"})
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if response.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _same_farm(state: dict[str, Any]) -> bool:
    """Whether this shell's settings name the running farm's broker and registry (unset
    names it: commands use the running farm's then)."""
    env = _farm_env()
    for variable, key in (("FARM_BROKER_URL", "broker_url"), ("FARM_DATABASE_URL", "database_url")):
        mine = env.get(variable)
        if mine and mine != state.get(key):
            return False
    return True

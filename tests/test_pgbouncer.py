"""The registry behind a real PgBouncer in transaction mode, as docs/scaling.md advises for
a fleet past PostgreSQL's connections: each transaction may run on another server session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from farm.registry import queries, transaction, upgrade
from tests.conftest import _missing, drop_pg_database, free_port, make_pg_database


@pytest.fixture
def pgbouncer(pg_server: str) -> Iterator[str]:
    """PgBouncer in transaction mode in front of the test PostgreSQL; its URL's server part."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        _missing("pgbouncer", "not installed (Debian's package pgbouncer)")
    server = make_url(pg_server)
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="farm-pgbouncer-"))
    folder.chmod(0o755)  # PgBouncer will not run as root: it runs as postgres and reads here
    (folder / "users.txt").write_text(f'"{server.username}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={server.host} port={server.port or 5432}\n\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n"
        f"auth_file = {folder}/users.txt\npool_mode = transaction\ndefault_pool_size = 4\n"
        "unix_socket_dir =\nignore_startup_parameters = extra_float_digits,options\n"
    )
    for f in folder.iterdir():
        f.chmod(0o644)
    user = ["-u", "postgres"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [binary, *user, str(folder / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _missing("pgbouncer", (proc.communicate()[1] or "did not listen")[-500:])
            time.sleep(0.1)
    try:
        yield server.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_registry_works_through_pgbouncer_in_transaction_mode(pg_server, pgbouncer):
    """psycopg prepares a statement on the server once it ran 5 times; through PgBouncer's
    transaction mode the next run may land on another server session, and farm's registry
    calls failed with "prepared statement _pg3_0 does not exist" (or "already exists")."""
    direct = make_pg_database(pg_server)
    through = make_url(pgbouncer).set(database=make_url(direct).database)
    url = through.render_as_string(hide_password=False)
    errors: list[BaseException] = []
    done = [0]

    def reader() -> None:
        try:
            for _ in range(30):
                with transaction(url) as s:
                    assert [m.name for m in queries.list_models(s)] == ["m"]
                done[0] += 1
        except BaseException as e:
            errors.append(e)

    try:
        upgrade(url)
        with transaction(url) as s:
            queries.add_model(s, name="m", path="/nonexistent/m.gguf", n_ctx=2048)
        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        assert done[0] == 6 * 30
    finally:
        from farm.registry.db import get_engine

        get_engine(url).dispose()
        drop_pg_database(pg_server, direct)

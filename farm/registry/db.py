"""Engines, sessions and migrations for the registry.

SQLite (WAL mode) by default, PostgreSQL through FARM_DATABASE_URL. The caller owns the
transaction: `transaction()` opens one and commits it when the block ends; query functions
in `queries/` take the session and never commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from farm.config import get_settings, masked
from farm.errors import ConfigError, FarmUnavailable


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per database URL for the life of the process."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; farm installs psycopg 3.
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    # No pool_pre_ping: on a connection broken mid-outage, SQLAlchemy's psycopg ping fails,
    # then blocks (or raises ProgrammingError) restoring autocommit on the dead connection,
    # which hung a job's thread. A broken connection instead fails its first statement as
    # a disconnect, the pool is invalidated, and farm's callers retry (FarmUnavailable).
    settings = get_settings()
    engine = create_engine(
        url,
        connect_args=_connect_args(parsed),
        # SQLAlchemy's default (5 kept, 10 more under load) let 50 workers of 4 slots open
        # past PostgreSQL's 100 connections in a burst (bench/fleet.py): "too many clients".
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )
    if parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _postgresql_session)
    return engine


def _connect_args(parsed: Any) -> dict[str, Any]:
    if parsed.get_backend_name() != "postgresql":
        return {}
    # A connection whose peer vanished (a server or network gone without a reset) fails
    # within seconds instead of blocking a worker's job thread forever.
    return {
        # No server-side prepared statements (psycopg prepares a query run 5 times): behind
        # PgBouncer in transaction mode, which the fleet at size needs (docs/scaling.md),
        # the next transaction may run on another server session, where the statement is
        # unknown ("prepared statement _pg3_0 does not exist") or taken ("already exists").
        "prepare_threshold": None,
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10000,
    }


# farm's transactions last milliseconds. A server session left idle inside one for this
# long has lost its client (its host gone, or cut off by the network, mid-transaction):
# the server ends it and frees the rows it locked. Without this the server keeps such a
# session, and its locks on a job's usage row, until its own TCP keepalive gives up (two
# hours by default), and every delivery of that job waits on them.
IDLE_IN_TRANSACTION_MS = 30_000

# The server's own keepalives on farm's connections: a pooled connection of a host that
# vanished (powered off, cut off by the network) is closed by the server after about
# 60 + 6 x 10 s of silence, instead of the system's two hours; a hundred workers' idle
# pools would otherwise fill max_connections with sessions of hosts long gone. A live
# client's kernel answers the probes, so an idle pool of a live host is kept.
KEEPALIVES = {
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "6",
}


def _postgresql_session(dbapi_conn: Any, _record: Any) -> None:
    """Set on each new connection, each only where the operator left it at PostgreSQL's
    default (set for the role, the database, or in the URL's options, to 0 included, it
    is kept). SETs rather than startup options: PgBouncer refuses unknown startup options.
    (Behind PgBouncer in transaction mode, a session's settings do not follow it: set
    PgBouncer's own idle_transaction_timeout and tcp_keepalive there.)"""
    with dbapi_conn.cursor() as cur:
        wanted = {"idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS), **KEEPALIVES}
        for name, value in wanted.items():
            cur.execute(
                "SELECT set_config(name, %s, false) FROM pg_settings "
                "WHERE name = %s AND source = 'default'",
                (value, name),
            )
    dbapi_conn.commit()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # WAL with synchronous=NORMAL stays consistent after a crash and skips an fsync per commit.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A session whose work is committed when the block ends and rolled back on error."""
    try:
        with _sessionmaker(url).begin() as session:
            yield session
    except OperationalError as e:
        raise FarmUnavailable(
            f"cannot use the registry at {_safe(url)}: {e.orig}; check FARM_DATABASE_URL "
            "and run `farm db upgrade`"
        ) from e
    except PoolTimeout as e:  # every connection of this process's pool stayed busy
        raise FarmUnavailable(
            f"no connection to the registry at {_safe(url)} came free in time (this "
            "process's pool: FARM_DATABASE_POOL_SIZE + FARM_DATABASE_MAX_OVERFLOW); the "
            "registry may be slow, or the pool too small for this process's load"
        ) from e


def _safe(url: str) -> str:
    return masked(url)


# -- migrations -----------------------------------------------------------------------------
def alembic_config(url: str) -> Any:
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the registry's schema up to `revision` (creating the database file if needed)."""
    from alembic import command

    cfg = alembic_config(url)
    try:
        with get_engine(url).begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except OperationalError as e:
        raise FarmUnavailable(
            f"cannot reach the registry at {_safe(url)} to migrate it: {e.orig}; check "
            "FARM_DATABASE_URL and that the database server runs"
        ) from e


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_schema(url: str) -> None:
    """Raise a clear error when the registry has not been migrated yet."""
    try:
        with get_engine(url).connect() as conn:
            migrated = inspect(conn).has_table("alembic_version")
    except OperationalError as e:
        raise FarmUnavailable(f"cannot reach the registry at {_safe(url)}: {e.orig}") from e
    if not migrated:
        raise ConfigError(
            f"the registry at {_safe(url)} has no tables yet: run `farm db upgrade` "
            "(or `farm up`, which does it for you)"
        )

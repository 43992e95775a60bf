"""Turning ``store.url`` into an SQLAlchemy engine: env-var secrets, SQLite paths and pragmas.

SQLite is the default (one file, no server) and must survive several writers (Serve replicas, the
online job) without "database is locked": WAL lets readers run beside the writer, busy_timeout
makes writers queue instead of failing, and write transactions take the lock up front.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import Pool

from rlhf.store.errors import StoreInputError

URL_KEY = "store.url"
# A writer waits this long for another writer's transaction before SQLite gives up.
BUSY_TIMEOUT_MS = 30_000
# Connection execution option that marks a write transaction (see _begin_sqlite).
WRITE_OPTION = "rlhf_write"

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_EXPANDED_PARTS = ("username", "password", "host", "database")


def _expand(text: str) -> str:
    """Replace each ``${VAR}`` by its value; an unset variable is an error, never an empty string."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise StoreInputError(
                URL_KEY, f"uses ${{{name}}} but the environment variable {name} is not set; "
                f"export {name}=... where the job runs (secrets stay out of config files)"
            )
        return os.environ[name]

    return _PLACEHOLDER.sub(value, text)


def _expand_url(url: sa.URL) -> sa.URL:
    """Expand placeholders part by part after parsing, so a password holding ``@`` or ``/``
    needs no URL escaping."""
    parts = {name: _expand(getattr(url, name)) for name in _EXPANDED_PARTS if getattr(url, name)}
    query = {
        key: _expand(value) if isinstance(value, str) else tuple(map(_expand, value))
        for key, value in url.query.items()
    }
    return url.set(query=query, **parts)


def _absolute_sqlite(url: sa.URL) -> sa.URL:
    """Make a SQLite file path absolute and create its folder: Ray workers do not share the
    driver's working directory, so a relative path would open a different (empty) database."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return url
    path = Path(url.database).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return url.set(database=str(path))


def resolve_url(url: str) -> sa.URL:
    """Parse ``store.url``, expand ``${VAR}`` secrets (not in the port) and fix SQLite paths."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise StoreInputError(
            URL_KEY, f"not a valid SQLAlchemy URL ({exc}); e.g. sqlite:///feedback.db or "
            "postgresql+psycopg://user:${PGPASSWORD}@host:5432/db (${VAR} is not allowed in the port)"
        ) from exc
    return _absolute_sqlite(_expand_url(parsed))


def _connect_sqlite(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings: WAL + synchronous=FULL make a commit durable on return."""
    # Autocommit at the driver level: SQLAlchemy's "begin" event (below) issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _enable_wal(cursor)
    for pragma in ("synchronous=FULL", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    """Switch a new file to WAL (a no-op once it is). The switch needs an exclusive lock, and when
    several connections open a new file at once SQLite answers "database is locked" at once
    instead of waiting (busy_timeout does not apply), so retry until the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _begin_sqlite(connection: sa.Connection) -> None:
    """Write transactions take the write lock at BEGIN, where busy_timeout applies; a deferred
    transaction that reads first and then writes fails at once if another writer committed
    in between (SQLITE_BUSY_SNAPSHOT), whatever the timeout."""
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def create_engine(url: sa.URL, poolclass: type[Pool] | None = None) -> sa.Engine:
    """An engine for a resolved URL, with the SQLite hooks above when the URL is SQLite."""
    options: dict[str, Any] = {"pool_pre_ping": True}
    if poolclass is not None:
        options["poolclass"] = poolclass
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, **options)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False}, **options)
    event.listen(engine, "connect", _connect_sqlite)
    event.listen(engine, "begin", _begin_sqlite)
    return engine

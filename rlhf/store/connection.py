"""Turning ``store.url`` into an SQLAlchemy engine: env-var secrets, SQLite paths and pragmas.

SQLite is the default (one file, no server) and must survive several writers (Serve replicas, the
online job) without "database is locked": WAL lets readers run beside the writer, busy_timeout
makes writers queue instead of failing, and write transactions take the lock up front.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import NullPool, Pool

from rlhf.store.errors import StoreInputError

URL_KEY = "store.url"
# A writer waits this long for another writer's transaction before SQLite gives up.
BUSY_TIMEOUT_MS = 30_000
# Connection execution option that marks a write transaction (see _begin_sqlite).
WRITE_OPTION = "rlhf_write"
# Named in every store.url error, so the one line says what would have worked.
ACCEPTED_FORMS = "sqlite:///path/feedback.db or postgresql+psycopg://user:${PGPASSWORD}@host:5432/db"
# check_url gives up on a server that has not answered by then (a firewall drops packets silently).
CHECK_TIMEOUT_S = 5.0

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
    username, password, host, database = (
        _expand(part) if part else part for part in (url.username, url.password, url.host, url.database)
    )
    query = {
        key: _expand(value) if isinstance(value, str) else tuple(map(_expand, value))
        for key, value in url.query.items()
    }
    return url.set(username=username, password=password, host=host, database=database, query=query)


def _absolute_sqlite(url: sa.URL) -> sa.URL:
    """Make a SQLite file path absolute and create its folder: Ray workers do not share the
    driver's working directory, so a relative path would open a different (empty) database."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return url
    path = Path(url.database).expanduser().resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreInputError(
            URL_KEY, f"cannot create the folder of the SQLite file {path} ({exc.strerror}); "
            f"accepted forms: {ACCEPTED_FORMS}"
        ) from exc
    return url.set(database=str(path))


def redact_url(url: str) -> str:
    """``store.url`` fit to print or save: a literal password becomes ``***`` (a ``${VAR}`` stays,
    since it names the secret without holding it); an unparsable URL is returned unchanged."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return url
    if parsed.password is None or str(parsed.password).startswith("${"):
        return url
    return parsed.render_as_string(hide_password=True)


def resolve_url(url: str) -> sa.URL:
    """Parse ``store.url``, expand ``${VAR}`` secrets (not in the port) and fix SQLite paths."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise StoreInputError(
            URL_KEY, f"not a valid SQLAlchemy URL ({exc}); accepted forms: {ACCEPTED_FORMS} "
            "(${VAR} is not allowed in the port)"
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


def check_url(url: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Open and close one connection to ``store.url``, so that jobs fail in seconds with one line
    before any Ray work, not with a traceback from a Serve replica or Ray worker much later.

    Raises StoreInputError for a URL that does not parse, an unset ``${VAR}``, an unknown dialect,
    a driver that is not installed, a SQLite folder that cannot be created, or a server that
    refuses or does not answer within ``timeout_s``. The password is never part of the message.
    """
    resolved = resolve_url(url)
    try:
        dialect = resolved.get_dialect()
    except sa.exc.NoSuchModuleError as exc:
        raise _check_error(f"unknown database dialect or driver {resolved.drivername!r}") from exc
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise _check_error(
            f"the driver of {resolved.drivername!r} is not installed ({exc}); install it where the job runs"
        ) from exc
    failure = _connect_once(create_engine(resolved, poolclass=NullPool), timeout_s)
    if failure is None:
        return
    if isinstance(failure, TimeoutError):
        where = f"{resolved.host}:{resolved.port}" if resolved.port else resolved.host or "the server"
        raise _check_error(f"no answer from the database server at {where} within {timeout_s:g} s")
    detail = str(getattr(failure, "orig", None) or failure)
    if resolved.password:
        detail = detail.replace(resolved.password, "***")
    raise _check_error(f"cannot connect to the database ({' '.join(detail.split())})") from None


def _connect_once(engine: sa.Engine, timeout_s: float) -> Exception | None:
    """Connect and run ``SELECT 1`` in a daemon thread: drivers' own timeouts differ (libpq has
    none by default), and a daemon thread left waiting does not keep the failing job alive."""
    outcome: list[Exception | None] = [TimeoutError()]

    def connect() -> None:
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            outcome[0] = None
        except Exception as exc:  # any driver error: reported to the caller as the URL's problem
            outcome[0] = exc
        finally:
            engine.dispose()

    thread = threading.Thread(target=connect, name="store-url-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0]


def _check_error(problem: str) -> StoreInputError:
    return StoreInputError(URL_KEY, f"{problem}; accepted forms: {ACCEPTED_FORMS}")

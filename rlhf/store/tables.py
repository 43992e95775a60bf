"""The feedback database's tables (SQLAlchemy Core) and the schema version check.

Core rather than ORM: the store hands out frozen records and Arrow tables, never live objects
tied to a session, and the same ``select`` feeds both the in-process tables and Ray Data.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from rlhf.store.engine import URL_KEY, WRITE_OPTION
from rlhf.store.errors import StoreInputError

# Bump with a migration step in create_schema whenever the tables change.
SCHEMA_VERSION = 1
# The source column of preference rows that came from this store.
FEEDBACK_SOURCE = "feedback"


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database.

    SQLite has no time zones and PostgreSQL's ``timestamptz`` would render in the session's
    zone; naive UTC compares and sorts the same way on both.
    """

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    # One row; a primary key so that two processes creating the database cannot both insert it.
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
)

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    # Dedupe key: PostgreSQL cannot put a unique btree index on texts longer than ~2.7 kB.
    sa.Column("text_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("title", sa.Text),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

comparisons = sa.Table(
    "comparisons",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("document_id", sa.String(36), sa.ForeignKey("documents.id"), nullable=False, index=True),
    sa.Column("summary_0", sa.Text, nullable=False),
    sa.Column("summary_1", sa.Text, nullable=False),
    sa.Column("policy_0", sa.String(64), nullable=False),
    sa.Column("policy_1", sa.String(64), nullable=False),
    # NULL while pending, then the index (0 or 1) of the preferred summary.
    sa.Column("choice", sa.SmallInteger, sa.CheckConstraint("choice IN (0, 1)", name="choice_is_0_or_1")),
    sa.Column("labeler", sa.String(200)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("decided_at", UTCDateTime, index=True),
)


def utcnow() -> datetime:
    """The one clock of the store: aware UTC."""
    return datetime.now(timezone.utc)


def create_schema(engine: sa.Engine, attempts: int = 3) -> None:
    """Create missing tables, record the schema version, refuse a database of another version.

    Several processes (Serve replicas, a job) may open a new PostgreSQL database at once; the
    loser of the CREATE TABLE race gets an error, retries, and then finds the tables.
    """
    for attempt in range(attempts):
        try:
            version = _create_once(engine)
            break
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
    if version != SCHEMA_VERSION:
        raise StoreInputError(
            URL_KEY, f"database schema version {version} but this code reads version {SCHEMA_VERSION}; "
            "use the rlhf release that created it, or a new database"
        )


def _create_once(engine: sa.Engine) -> Any:
    """One transaction: create_all, then read (or write) the version row."""
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
        metadata.create_all(conn)
        version = conn.scalar(sa.select(schema_version.c.version))
        if version is None:
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
            version = SCHEMA_VERSION
    return version

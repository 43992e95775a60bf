"""The feedback database's tables (SQLAlchemy Core) and the migrations between schema versions.

Core rather than ORM: the store hands out frozen records and Arrow tables, never live objects
tied to a session, and the same ``select`` feeds both the in-process tables and Ray Data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone

import sqlalchemy as sa

from rlhf.store.engine import URL_KEY, WRITE_OPTION
from rlhf.store.errors import StoreInputError

# Bump with a step in MIGRATIONS whenever the tables change.
SCHEMA_VERSION = 3
# The source column of preference rows that came from this store.
FEEDBACK_SOURCE = "feedback"

logger = logging.getLogger(__name__)


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

# A comparison records what was shown and never changes; a person's choice is a separate, later
# event with its own table. Its primary key is the comparison id, so the database itself allows one
# choice per comparison and recording a choice is a plain insert (a conflict means already decided).
comparisons = sa.Table(
    "comparisons",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("document_id", sa.String(36), sa.ForeignKey("documents.id"), nullable=False, index=True),
    sa.Column("summary_0", sa.Text, nullable=False),
    sa.Column("summary_1", sa.Text, nullable=False),
    sa.Column("policy_0", sa.String(64), nullable=False),
    sa.Column("policy_1", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

choices = sa.Table(
    "choices",
    metadata,
    sa.Column("comparison_id", sa.String(36), sa.ForeignKey("comparisons.id"), primary_key=True),
    # The index (0 or 1) of the preferred summary.
    sa.Column(
        "choice", sa.SmallInteger, sa.CheckConstraint("choice IN (0, 1)", name="choice_is_0_or_1"),
        nullable=False,
    ),
    sa.Column("labeler", sa.String(200)),
    sa.Column("decided_at", UTCDateTime, nullable=False, index=True),
)

# The online loop's ledger (jobs/online.py): one row per cycle with the feedback window it trains
# on, so a restarted loop redoes an unfinished cycle on exactly the same rows.
online_cycles = sa.Table(
    "online_cycles",
    metadata,
    sa.Column("cycle", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("since", UTCDateTime),  # exclusive bound of decided_at; NULL = from the first choice
    sa.Column("until", UTCDateTime, nullable=False),  # inclusive bound
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("record", sa.Text, nullable=False),  # JSON: rows used, accuracies, versions, metrics
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
)


def utcnow() -> datetime:
    """The one clock of the store: aware UTC."""
    return datetime.now(timezone.utc)


def _v1_to_v2(conn: sa.Connection) -> None:
    """Move the choice columns of ``comparisons`` into the ``choices`` table.

    SQLite cannot drop a column that a CHECK constraint or an index names, and a renamed table keeps
    its index names (on PostgreSQL also its primary key's ``comparisons_pkey``), which the new table
    needs. So: copy the rows aside (CREATE TABLE AS copies no constraints or indexes), drop the old
    table, create the new ones, copy back, drop the copy. Uses the current definitions, which are
    v2's; the next step that changes these tables must freeze a copy of them here.
    """
    conn.execute(sa.text("CREATE TABLE comparisons_v1 AS SELECT * FROM comparisons"))
    conn.execute(sa.text("DROP TABLE comparisons"))
    metadata.create_all(conn, tables=[comparisons, choices])
    shown = [column.name for column in comparisons.columns]
    old = sa.table("comparisons_v1", *map(sa.column, [*shown, "choice", "labeler", "decided_at"]))
    conn.execute(comparisons.insert().from_select(shown, sa.select(*(old.c[name] for name in shown))))
    decided = sa.select(old.c.id, old.c.choice, old.c.labeler, old.c.decided_at).where(
        old.c.choice.is_not(None)
    )
    conn.execute(choices.insert().from_select([column.name for column in choices.columns], decided))
    conn.execute(sa.text("DROP TABLE comparisons_v1"))


def _v2_to_v3(conn: sa.Connection) -> None:
    """Add the online loop's ledger."""
    metadata.create_all(conn, tables=[online_cycles])


# Step N upgrades a database from version N - 1 to N, inside the caller's write transaction.
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {2: _v1_to_v2, 3: _v2_to_v3}


def create_schema(engine: sa.Engine, attempts: int = 3) -> None:
    """Create a new database, upgrade an older one, refuse one newer than this code.

    Several processes (Serve replicas, a job) may open a new PostgreSQL database at once; the
    loser of the CREATE TABLE race gets an error, retries, and then finds the tables. Processes
    opening an older database at once upgrade it once: the others wait, then find it current.
    """
    for attempt in range(attempts):
        try:
            applied = _create_or_upgrade(engine)
            break
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
    for step in applied:
        logger.info("upgraded the feedback database %s from schema version %d to %d",
                    engine.url, step - 1, step)


def _create_or_upgrade(engine: sa.Engine) -> list[int]:
    """One write transaction: create all tables, or run the missing migration steps; the steps run.

    All steps and the version row change together, so a failed upgrade leaves the old database.
    """
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
        if not sa.inspect(conn).has_table(schema_version.name):
            metadata.create_all(conn)
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
            return []
        # FOR UPDATE: on PostgreSQL a second process upgrading at once waits here, then reads the new
        # version (SQLite's BEGIN IMMEDIATE already serialises writers; it has no FOR UPDATE).
        version = conn.scalar(sa.select(schema_version.c.version).with_for_update())
        if version > SCHEMA_VERSION:
            raise StoreInputError(
                URL_KEY, f"database schema version {version} but this code reads version {SCHEMA_VERSION}; "
                "use the rlhf release that created it, or a new database"
            )
        applied = list(range(version + 1, SCHEMA_VERSION + 1))
        for step in applied:
            MIGRATIONS[step](conn)
            conn.execute(schema_version.update().values(version=step))
    return applied

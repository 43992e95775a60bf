"""The feedback database's tables (SQLAlchemy Core) and the migrations between schema versions.

Core rather than ORM: the store hands out frozen records and Arrow tables, never live objects
tied to a session, and the same ``select`` feeds both the in-process tables and Ray Data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Literal, get_args

import sqlalchemy as sa

from rlhf.store.connection import URL_KEY, WRITE_OPTION
from rlhf.store.errors import StoreInputError

# Bump with a step in MIGRATIONS whenever the tables change.
SCHEMA_VERSION = 4
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

# What a labeler decided about a comparison (choices.verdict): a preference names the better summary in
# ``choice``; the other two are stored for quality control and never trained on (choice is NULL).
Verdict = Literal["preference", "both_bad", "cant_tell"]
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
# choices.labeler and comparisons.shown_to while serve.labeler_auth is off: nobody is identified.
ANONYMOUS = "anonymous"

# People who label, each with a bearer token the server stores only as its sha256. Revoking sets
# revoked_at and keeps the row, so the ids in choices.labeler always resolve to a name.
labelers = sa.Table(
    "labelers",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime),
)

# Known-answer pairs (POST /admin/gold): each showing is a new comparison row naming its gold pair,
# with the answer for the order it was shown in.
gold_pairs = sa.Table(
    "gold_pairs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("document_id", sa.String(36), sa.ForeignKey("documents.id"), nullable=False),
    sa.Column("summary_0", sa.Text, nullable=False),
    sa.Column("summary_1", sa.Text, nullable=False),
    sa.Column("answer", sa.SmallInteger, sa.CheckConstraint("answer IN (0, 1)", name="gold_answer_is_0_or_1"),
              nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# A comparison records what was shown, to whom, and never changes; a person's choice is a separate,
# later event with its own table. Its primary key is the comparison id, so the database itself allows
# one choice per comparison and recording a choice is a plain insert (a conflict means already
# decided); showing the same pair again (overlap, gold) is a new comparison row.
comparisons = sa.Table(
    "comparisons",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("document_id", sa.String(36), sa.ForeignKey("documents.id"), nullable=False, index=True),
    sa.Column("summary_0", sa.Text, nullable=False),
    sa.Column("summary_1", sa.Text, nullable=False),
    sa.Column("policy_0", sa.String(64), nullable=False),
    sa.Column("policy_1", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),  # when it was shown
    # The labeler id it was shown to (ANONYMOUS without labeler auth); NULL before schema v4.
    sa.Column("shown_to", sa.String(36), index=True),
    # The comparison whose document and summaries this one shows again to another labeler.
    sa.Column("overlap_of", sa.String(36), sa.ForeignKey("comparisons.id"), index=True),
    sa.Column("gold_id", sa.String(36), sa.ForeignKey("gold_pairs.id"), index=True),
    sa.Column("gold_answer", sa.SmallInteger),  # the right index in the order shown; NULL unless gold
    sa.CheckConstraint("(gold_id IS NULL) = (gold_answer IS NULL) AND "
                       "(gold_answer IS NULL OR gold_answer IN (0, 1))", name="gold_has_an_answer"),
)


def _decision_columns(choice_nullable: bool) -> list[sa.Column]:
    """The columns ``choices`` has had since schema v2: the comparison, the index (0 or 1) of the
    preferred summary, who decided (a labeler id, ANONYMOUS, or a name typed before schema v4) and
    when. Since v4 ``choice`` is NULL exactly when the verdict is not a preference."""
    return [
        sa.Column("comparison_id", sa.String(36), sa.ForeignKey("comparisons.id"), primary_key=True),
        sa.Column("choice", sa.SmallInteger, sa.CheckConstraint("choice IN (0, 1)", name="choice_is_0_or_1"),
                  nullable=choice_nullable),
        sa.Column("labeler", sa.String(200)),
        sa.Column("decided_at", UTCDateTime, nullable=False, index=True),
    ]


choices = sa.Table(
    "choices",
    metadata,
    *_decision_columns(choice_nullable=True),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("confidence", sa.SmallInteger,
              sa.CheckConstraint("confidence BETWEEN 1 AND 4", name="confidence_is_1_to_4")),
    sa.Column("note", sa.Text),
    sa.Column("decision_s", sa.Float),  # seconds from showing to deciding; NULL before schema v4
    sa.CheckConstraint(f"verdict IN {VERDICTS}", name="verdict_is_known"),
    sa.CheckConstraint("(verdict = 'preference') = (choice IS NOT NULL)", name="choice_iff_preference"),
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


# comparisons and choices as schema versions 2 and 3 defined them, frozen for the steps that create or
# read them; their indexes and constraints have the names the current tables reuse.
_v3 = sa.MetaData()
_V3_COMPARISONS = sa.Table(
    "comparisons",
    _v3,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("document_id", sa.String(36), sa.ForeignKey(documents.c.id), nullable=False, index=True),
    sa.Column("summary_0", sa.Text, nullable=False),
    sa.Column("summary_1", sa.Text, nullable=False),
    sa.Column("policy_0", sa.String(64), nullable=False),
    sa.Column("policy_1", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
_V3_CHOICES = sa.Table("choices", _v3, *_decision_columns(choice_nullable=False))


def _v1_to_v2(conn: sa.Connection) -> None:
    """Move the choice columns of ``comparisons`` into the ``choices`` table.

    SQLite cannot drop a column that a CHECK constraint or an index names, and a renamed table keeps
    its index names (on PostgreSQL also its primary key's ``comparisons_pkey``), which the new table
    needs. So: copy the rows aside (CREATE TABLE AS copies no constraints or indexes), drop the old
    table, create the new ones, copy back, drop the copy. Creates the frozen v2 definitions
    (``_V3_*``, unchanged in v3), never the current ones.
    """
    conn.execute(sa.text("CREATE TABLE comparisons_v1 AS SELECT * FROM comparisons"))
    conn.execute(sa.text("DROP TABLE comparisons"))
    _v3.create_all(conn, tables=[_V3_COMPARISONS, _V3_CHOICES])
    shown = [column.name for column in _V3_COMPARISONS.columns]
    old = sa.table("comparisons_v1", *map(sa.column, [*shown, "choice", "labeler", "decided_at"]))
    conn.execute(_V3_COMPARISONS.insert().from_select(shown, sa.select(*(old.c[name] for name in shown))))
    decided = sa.select(old.c.id, old.c.choice, old.c.labeler, old.c.decided_at).where(
        old.c.choice.is_not(None)
    )
    conn.execute(_V3_CHOICES.insert().from_select([column.name for column in _V3_CHOICES.columns], decided))
    conn.execute(sa.text("DROP TABLE comparisons_v1"))


def _v2_to_v3(conn: sa.Connection) -> None:
    """Add the online loop's ledger."""
    metadata.create_all(conn, tables=[online_cycles])


def _v3_to_v4(conn: sa.Connection) -> None:
    """Labelers, gold pairs, who each comparison was shown to, and the richer answers.

    ``choices.choice`` becomes nullable and both tables gain CHECK constraints, which SQLite cannot
    add to an existing table; so, as in ``_v1_to_v2``, copy both aside, drop them, create the
    current tables and copy back. Old choices become preferences with no confidence, note or
    decision time; old comparisons were shown to nobody known (``shown_to`` NULL). Uses the current
    definitions, which are v4's; the next step that changes these tables must freeze a copy of them.
    """
    for old in ("choices", "comparisons"):
        conn.execute(sa.text(f"CREATE TABLE {old}_v3 AS SELECT * FROM {old}"))
    conn.execute(sa.text("DROP TABLE choices"))
    conn.execute(sa.text("DROP TABLE comparisons"))
    metadata.create_all(conn, tables=[labelers, gold_pairs, comparisons, choices])
    for new, frozen, added in ((comparisons, _V3_COMPARISONS, {}),
                               (choices, _V3_CHOICES, {"verdict": sa.literal("preference")})):
        names = [column.name for column in frozen.columns]
        old_table = sa.table(f"{new.name}_v3", *map(sa.column, names))
        rows = sa.select(*(old_table.c[name] for name in names),
                         *(value.label(key) for key, value in added.items()))
        conn.execute(new.insert().from_select([*names, *added], rows))
        conn.execute(sa.text(f"DROP TABLE {new.name}_v3"))


# Step N upgrades a database from version N - 1 to N, inside the caller's write transaction.
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {2: _v1_to_v2, 3: _v2_to_v3, 4: _v3_to_v4}


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
        if version is None:
            raise StoreInputError(URL_KEY, f"the {schema_version.name} table has no row; not a database "
                                  "this code created, use a new database")
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

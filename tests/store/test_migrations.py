"""Schema migrations against real SQLite and PostgreSQL databases: databases exactly as versions 1
and 3 wrote them upgrade keeping every row, end with the schema of a new database, and a failed or
concurrent upgrade leaves nothing half-done."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from support.store import schema_of

from rlhf.store import Comparison, FeedbackStore
from rlhf.store.connection import create_engine, resolve_url
from rlhf.store.tables import MIGRATIONS, SCHEMA_VERSION, UTCDateTime

POLICIES = ("v0001", "v0002")


# Schema version 1, exactly as rlhf/store/tables.py defined it, to build the databases that older
# releases left behind.
V1 = sa.MetaData()
V1_VERSION = sa.Table(
    "schema_version", V1, sa.Column("version", sa.Integer, primary_key=True, autoincrement=False)
)
V1_DOCUMENTS = sa.Table(
    "documents",
    V1,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("text_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("title", sa.Text),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
V1_COMPARISONS = sa.Table(
    "comparisons",
    V1,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("document_id", sa.String(36), sa.ForeignKey("documents.id"), nullable=False, index=True),
    sa.Column("summary_0", sa.Text, nullable=False),
    sa.Column("summary_1", sa.Text, nullable=False),
    sa.Column("policy_0", sa.String(64), nullable=False),
    sa.Column("policy_1", sa.String(64), nullable=False),
    sa.Column("choice", sa.SmallInteger, sa.CheckConstraint("choice IN (0, 1)", name="choice_is_0_or_1")),
    sa.Column("labeler", sa.String(200)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("decided_at", UTCDateTime, index=True),
)
T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


@dataclasses.dataclass
class V1Database:
    """What a version 1 database held, read with version 1's queries before any migration."""

    comparisons: list[Comparison]
    preferences: list[dict]  # the rows of the old comparisons_table()
    prompts: list[dict]  # the rows of the old documents_table()


def _v1_comparison(row: sa.RowMapping) -> Comparison:
    """A version 1 comparison row as the current store reads it: a version 1 choice is a preference."""
    return Comparison(**row, verdict=None if row["choice"] is None else "preference")


def _build_v1_database(url: str) -> V1Database:
    """Two documents and four comparisons (one pending, one decided without a labeler, decided in
    another order than created) in a version 1 database, as version 1's store wrote them."""
    engine = create_engine(resolve_url(url))
    documents = [("d1", "first document", "T1", "paste"), ("d2", "second document", None, "pdf")]
    # id, document, created and decided (seconds after T0), choice, labeler, policies
    comparisons = [
        ("c1", "d1", 2, 10, 1, "ann", POLICIES), ("c2", "d2", 3, 5, 0, None, POLICIES),
        ("c3", "d1", 4, None, None, None, POLICIES), ("c4", "d2", 6, 7, 0, "bob", ("v0003", "v0001")),
    ]
    with engine.begin() as conn:
        V1.create_all(conn)
        conn.execute(V1_VERSION.insert().values(version=1))
        conn.execute(V1_DOCUMENTS.insert(), [
            {"id": id_, "text": text, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
             "title": title, "source": source, "created_at": T0 + timedelta(seconds=i)}
            for i, (id_, text, title, source) in enumerate(documents)
        ])
        conn.execute(V1_COMPARISONS.insert(), [
            {"id": id_, "document_id": doc, "summary_0": f"{id_} A", "summary_1": f"{id_} B",
             "policy_0": policies[0], "policy_1": policies[1], "choice": choice, "labeler": labeler,
             "created_at": T0 + timedelta(seconds=created),
             "decided_at": None if decided is None else T0 + timedelta(seconds=decided)}
            for id_, doc, created, decided, choice, labeler, policies in comparisons
        ])
    with engine.connect() as conn:
        old, docs = V1_COMPARISONS, V1_DOCUMENTS
        preferences = sa.select(
            docs.c.text.label("original_text"), old.c.summary_0, old.c.summary_1, old.c.choice,
            sa.literal("feedback").label("source"), old.c.policy_0, old.c.policy_1,
        ).join_from(old, docs, old.c.document_id == docs.c.id).where(old.c.decided_at.is_not(None)).order_by(
            old.c.decided_at, old.c.id
        )
        prompts = sa.select(docs.c.text.label("original_text")).order_by(docs.c.created_at, docs.c.id)
        database = V1Database(
            comparisons=[_v1_comparison(row) for row in conn.execute(sa.select(old)).mappings()],
            preferences=[dict(row) for row in conn.execute(preferences).mappings()],
            prompts=[dict(row) for row in conn.execute(prompts).mappings()],
        )
    engine.dispose()
    return database


def test_every_schema_version_after_the_first_has_a_migration_step():
    assert sorted(MIGRATIONS) == list(range(2, SCHEMA_VERSION + 1))


def test_a_version_1_database_is_migrated_keeping_every_row(url: str, caplog: pytest.LogCaptureFixture):
    before = _build_v1_database(url)
    assert len(before.comparisons) == 4 and len(before.preferences) == 3  # the data is not trivial
    caplog.set_level(logging.INFO, logger="rlhf.store.tables")
    store = FeedbackStore(url)

    assert "from schema version 1 to 2" in caplog.text
    with store.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version FROM schema_version")) == SCHEMA_VERSION == 4
    inspector = sa.inspect(store.engine)
    assert set(inspector.get_table_names()) == {
        "schema_version", "documents", "comparisons", "choices", "online_cycles", "labelers", "gold_pairs"
    }
    assert [column["name"] for column in inspector.get_columns("comparisons")] == [
        "id", "document_id", "summary_0", "summary_1", "policy_0", "policy_1", "created_at",
        "shown_to", "overlap_of", "gold_id", "gold_answer",
    ]
    # Every comparison, with its choice, labeler and decision time (or still pending).
    assert [store.get_comparison(comparison.id) for comparison in before.comparisons] == before.comparisons
    assert store.count_comparisons() == 4 and store.count_comparisons(pending=True) == 1
    assert store.comparisons_table().to_pylist() == before.preferences
    assert store.documents_table().to_pylist() == before.prompts
    store.close()

    caplog.clear()
    reopened = FeedbackStore(url)  # already current: nothing to do
    assert "schema version" not in caplog.text
    assert reopened.comparisons_table().to_pylist() == before.preferences
    reopened.close()


def test_a_failed_upgrade_leaves_the_version_1_database_as_it_was(url: str, monkeypatch):
    before = _build_v1_database(url)
    step = MIGRATIONS[2]

    def fail_after_the_step(conn: sa.Connection) -> None:
        step(conn)
        raise RuntimeError("disk full")

    monkeypatch.setitem(MIGRATIONS, 2, fail_after_the_step)
    with pytest.raises(RuntimeError, match="disk full"):
        FeedbackStore(url)
    engine = create_engine(resolve_url(url))
    with engine.connect() as conn:
        assert conn.scalar(sa.select(V1_VERSION.c.version)) == 1
        assert [_v1_comparison(row) for row in conn.execute(sa.select(V1_COMPARISONS)).mappings()] == (
            before.comparisons
        )
    assert not sa.inspect(engine).has_table("choices")
    engine.dispose()
    monkeypatch.undo()
    store = FeedbackStore(url)
    assert store.comparisons_table().to_pylist() == before.preferences
    store.close()


def test_concurrent_stores_upgrade_a_version_1_database_once(url: str, caplog: pytest.LogCaptureFixture):
    before = _build_v1_database(url)
    caplog.set_level(logging.INFO, logger="rlhf.store.tables")
    workers = 4
    barrier = threading.Barrier(workers, timeout=60)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            FeedbackStore(url).close()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(workers)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    assert caplog.text.count("from schema version 1 to 2") == 1
    store = FeedbackStore(url)
    assert [store.get_comparison(comparison.id) for comparison in before.comparisons] == before.comparisons
    store.close()


# Schema version 3 exactly as rlhf/store/tables.py defined it (before labelers and verdicts).
V3 = sa.MetaData()
# The version table and documents did not change from v1 to v3.
V3_VERSION, V3_DOCUMENTS = V1_VERSION.to_metadata(V3), V1_DOCUMENTS.to_metadata(V3)
V3_COMPARISONS = sa.Table(
    "comparisons", V3,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("document_id", sa.String(36), sa.ForeignKey("documents.id"), nullable=False, index=True),
    sa.Column("summary_0", sa.Text, nullable=False),
    sa.Column("summary_1", sa.Text, nullable=False),
    sa.Column("policy_0", sa.String(64), nullable=False),
    sa.Column("policy_1", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
V3_CHOICES = sa.Table(
    "choices", V3,
    sa.Column("comparison_id", sa.String(36), sa.ForeignKey("comparisons.id"), primary_key=True),
    sa.Column("choice", sa.SmallInteger, sa.CheckConstraint("choice IN (0, 1)", name="choice_is_0_or_1"),
              nullable=False),
    sa.Column("labeler", sa.String(200)),
    sa.Column("decided_at", UTCDateTime, nullable=False, index=True),
)
V3_CYCLES = sa.Table(
    "online_cycles", V3,
    sa.Column("cycle", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("since", UTCDateTime),
    sa.Column("until", UTCDateTime, nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("record", sa.Text, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
)


def _build_v3_database(url: str) -> None:
    """Two documents, three comparisons (one pending), two choices and one cycle, as v3 wrote them."""
    engine = create_engine(resolve_url(url))
    with engine.begin() as conn:
        V3.create_all(conn)
        conn.execute(V3_VERSION.insert().values(version=3))
        conn.execute(V3_DOCUMENTS.insert(), [
            {"id": f"d{i}", "text": f"document {i}", "text_sha256": hashlib.sha256(f"document {i}".encode())
             .hexdigest(), "title": None, "source": "paste", "created_at": T0} for i in (1, 2)
        ])
        conn.execute(V3_COMPARISONS.insert(), [
            {"id": f"c{i}", "document_id": f"d{1 + i % 2}", "summary_0": f"c{i} A", "summary_1": f"c{i} B",
             "policy_0": "v0001", "policy_1": "v0002", "created_at": T0 + timedelta(seconds=i)}
            for i in (1, 2, 3)
        ])
        conn.execute(V3_CHOICES.insert(), [
            {"comparison_id": "c1", "choice": 1, "labeler": "ann", "decided_at": T0 + timedelta(seconds=10)},
            {"comparison_id": "c2", "choice": 0, "labeler": None, "decided_at": T0 + timedelta(seconds=11)},
        ])
        conn.execute(V3_CYCLES.insert().values(cycle=1, since=None, until=T0, stage="done", record="{}",
                                               started_at=T0, finished_at=T0))
    engine.dispose()


def test_a_version_3_database_upgrades_keeping_every_row_with_v4_defaults(url: str):
    _build_v3_database(url)
    store = FeedbackStore(url)
    with store.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version FROM schema_version")) == SCHEMA_VERSION == 4
        assert conn.scalar(sa.text("SELECT count(*) FROM online_cycles")) == 1
    c1, c2, c3 = (store.get_comparison(f"c{i}") for i in (1, 2, 3))
    assert (c1.choice, c1.labeler, c1.decided_at) == (1, "ann", T0 + timedelta(seconds=10))
    assert (c2.choice, c2.labeler, c2.verdict) == (0, None, "preference")
    assert (c1.verdict, c1.confidence, c1.note, c1.decision_s) == ("preference", None, None, None)
    assert (c1.shown_to, c1.overlap_of, c1.gold_id, c1.gold_answer) == (None, None, None, None)
    assert c3.pending and c3.verdict is None and c3.created_at == T0 + timedelta(seconds=3)
    assert [row["summary_0"] for row in store.comparisons_table().to_pylist()] == ["c1 A", "c2 A"]
    assert store.count_comparisons() == 3 and store.count_decided() == 2
    # A pending v3 comparison was shown to nobody known, so anyone may still decide it.
    assert store.record_choice("c3", None, "someone", verdict="cant_tell").verdict == "cant_tell"
    store.close()


@pytest.mark.parametrize("build_old", [_build_v1_database, _build_v3_database], ids=["v1", "v3"])
def test_a_migrated_database_has_the_schema_of_a_new_one(new_url: Callable[[], str], build_old) -> None:
    """Every upgrade path ends in exactly the tables, columns, keys and constraints a new database has."""
    migrated_url, new = new_url(), new_url()
    build_old(migrated_url)
    migrated, created = FeedbackStore(migrated_url), FeedbackStore(new)
    assert schema_of(migrated.engine) == schema_of(created.engine)
    assert {"choices", "labelers", "gold_pairs"} <= set(schema_of(created.engine))
    migrated.close()
    created.close()

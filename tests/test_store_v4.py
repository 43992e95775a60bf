"""Schema v4 against real SQLite and PostgreSQL databases: the upgrade of a real v3 database, richer
answers that training never reads, labelers, gold scoring and overlap agreement."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from test_store import _schema

from rlhf.store import AlreadyDecidedError, FeedbackStore, InvalidFeedbackError, NotFoundError
from rlhf.store.connection import create_engine, resolve_url
from rlhf.store.labelers import Labelers, token_digest
from rlhf.store.queue import GoldPair, LabelingQueue
from rlhf.store.tables import SCHEMA_VERSION, UTCDateTime, choices

# Schema version 3 exactly as rlhf/store/tables.py defined it (before labelers and verdicts).
V3 = sa.MetaData()
V3_VERSION = sa.Table("schema_version", V3, sa.Column("version", sa.Integer, primary_key=True,
                                                       autoincrement=False))
V3_DOCUMENTS = sa.Table(
    "documents", V3,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("text_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("title", sa.Text),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
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
T0 = datetime(2025, 3, 1, 9, tzinfo=timezone.utc)


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


def test_a_migrated_v3_database_has_the_schema_of_a_new_one(new_url: Callable[[], str]):
    migrated_url, new = new_url(), new_url()
    _build_v3_database(migrated_url)
    migrated, created = FeedbackStore(migrated_url), FeedbackStore(new)
    assert _schema(migrated.engine) == _schema(created.engine)
    assert {"labelers", "gold_pairs"} <= set(_schema(created.engine))
    migrated.close()
    created.close()


def _comparison(store: FeedbackStore, text: str, shown_to: str | None = None) -> str:
    return store.create_comparison(store.add_document(text), f"{text} A", f"{text} B", "v0001", "v0002",
                                   shown_to=shown_to)


def test_verdicts_confidence_and_notes_are_stored_but_never_trained_on(store: FeedbackStore):
    liked, bad, unsure = (_comparison(store, f"doc {i}", "lab") for i in range(3))
    kept = store.record_choice(liked, 1, "lab", confidence=3, note="clearer")
    store.record_choice(bad, None, "lab", verdict="both_bad", note="both invent facts")
    store.record_choice(unsure, None, "lab", verdict="cant_tell", confidence=1)
    assert (kept.confidence, kept.note, kept.verdict) == (3, "clearer", "preference")
    assert 0 <= kept.decision_s < 60
    assert [row["summary_0"] for row in store.comparisons_table().to_pylist()] == ["doc 0 A"]
    assert store.count_decided() == 1
    export = {row["comparison_id"]: row for row in store.export_table().to_pylist()}
    assert (export[bad]["verdict"], export[bad]["choice"], export[bad]["note"]) == (
        "both_bad", None, "both invent facts")
    assert export[unsure]["confidence"] == 1 and export[liked]["labeler"] == "lab"
    with pytest.raises(AlreadyDecidedError, match="already decided as both_bad"):
        store.record_choice(bad, 0, "lab")


def test_bad_answers_name_the_field(store: FeedbackStore):
    comparison = _comparison(store, "checked", "lab")
    for kwargs, field in [({"choice": None}, "choice"), ({"choice": 0, "verdict": "both_bad"}, "choice"),
                          ({"choice": 0, "verdict": "meh"}, "verdict"),
                          ({"choice": 0, "confidence": 5}, "confidence"),
                          ({"choice": 0, "note": "x" * 2001}, "note")]:
        with pytest.raises(InvalidFeedbackError, match=f"^{field}:"):
            store.record_choice(comparison, labeler="lab", **kwargs)
    assert store.get_comparison(comparison).pending


def test_the_database_enforces_choice_iff_preference(store: FeedbackStore):
    comparison = _comparison(store, "raw insert")
    for values in ({"choice": None, "verdict": "preference"}, {"choice": 1, "verdict": "cant_tell"},
                   {"choice": 1, "verdict": "maybe"}):
        with pytest.raises(sa.exc.IntegrityError), store.write() as conn:
            conn.execute(choices.insert().values(comparison_id=comparison, decided_at=T0, **values))
    assert store.get_comparison(comparison).pending


def test_only_the_labeler_shown_a_comparison_may_decide_it(store: FeedbackStore):
    mine = _comparison(store, "shown to ann", "ann")
    with pytest.raises(NotFoundError, match=f"no comparison '{mine}'"):
        store.record_choice(mine, 0, "bob")
    assert store.get_comparison(mine).pending
    assert store.record_choice(mine, 0, "ann").labeler == "ann"


def test_labelers_have_hashed_tokens_and_revoking_keeps_the_row(store: FeedbackStore):
    labelers = Labelers(store)
    ann, token = labelers.create("Ann")
    assert len(token) >= 32 and labelers.by_token(token) == ann and labelers.by_token("wrong") is None
    with store.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT name, token_sha256 FROM labelers")).one()
    assert tuple(stored) == ("Ann", token_digest(token)) and token not in stored
    revoked = labelers.revoke(ann.id)
    assert revoked.revoked and labelers.by_token(token).revoked and len(labelers.all()) == 1
    with pytest.raises(NotFoundError, match="labeler_id"):
        labelers.revoke("nobody")
    with pytest.raises(InvalidFeedbackError, match="name"):
        labelers.create("  ")


def test_gold_scores_overlap_agreement_and_stats(store: FeedbackStore):
    labelers, queue = Labelers(store), LabelingQueue(store)
    (ann, _), (bob, _) = labelers.create("ann"), labelers.create("bob")
    queue.add_gold([GoldPair("gold text", "right", "wrong", 0), GoldPair("gold 2", "bad", "good", 1)])
    rng = random.Random(0)
    for labeler, correct in ((ann.id, True), (bob.id, False)):
        for _ in range(4):
            shown = queue.show_gold(labeler, rng)
            assert shown.policy_0 == "gold" and shown.shown_to == labeler
            store.record_choice(shown.id, shown.gold_answer if correct else 1 - shown.gold_answer, labeler)
    original = _comparison(store, "doubly shown", ann.id)
    store.record_choice(original, 1, ann.id)
    assert queue.show_overlap(ann.id, rng, False) is None  # never one's own pair
    again = queue.show_overlap(bob.id, rng, False)
    assert (again.overlap_of, again.summary_0, again.shown_to) == (original, "doubly shown A", bob.id)
    store.record_choice(again.id, None, bob.id, verdict="cant_tell")
    assert queue.show_overlap(bob.id, rng, False) is None  # each pair once per labeler
    scores = labelers.gold_scores()
    assert (scores[ann.id].accuracy, scores[bob.id].accuracy, scores[bob.id].answered) == (1.0, 0.0, 4)
    stats = {row.name: row for row in labelers.stats()}
    assert (stats["ann"].choices, stats["ann"].gold_answered, stats["ann"].overlap_pairs) == (5, 4, 1)
    assert stats["ann"].agreement == 0.0 and stats["bob"].cant_tell_share == 0.2
    assert stats["bob"].median_decision_s is not None and stats["ann"].revoked is False
    # Gold answers are never training rows; the overlap preference is.
    assert [row["summary_0"] for row in store.comparisons_table().to_pylist()] == ["doubly shown A"]
    assert labelers.count_decided(ann.id, T0) == 5

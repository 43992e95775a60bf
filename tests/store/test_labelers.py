"""Schema v4 against real SQLite and PostgreSQL databases: richer answers that training never reads,
labelers, gold scoring and overlap agreement (the v3 upgrade is in test_migrations.py)."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from rlhf.store import AlreadyDecidedError, FeedbackStore, InvalidFeedbackError, NotFoundError
from rlhf.store.labelers import Labelers, token_digest
from rlhf.store.queue import GoldPair, LabelingQueue
from rlhf.store.tables import choices

T0 = datetime(2025, 3, 1, 9, tzinfo=timezone.utc)


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
    assert (scores[ann.id].rate, scores[bob.id].rate, scores[bob.id].total) == (1.0, 0.0, 4)
    stats = {row.name: row for row in labelers.stats()}
    assert (stats["ann"].choices, stats["ann"].gold_answered, stats["ann"].overlap_pairs) == (5, 4, 1)
    assert stats["ann"].agreement == 0.0 and stats["bob"].cant_tell_share == 0.2
    assert stats["bob"].median_decision_s is not None and stats["ann"].revoked is False
    # Gold answers are never training rows; the overlap preference is.
    assert [row["summary_0"] for row in store.comparisons_table().to_pylist()] == ["doubly shown A"]
    assert labelers.count_decided(ann.id, T0) == 5

"""The labeling queue's store side: gold pairs with known answers, pairs shown again to a second
labeler (overlap), and the stored documents fresh pairs are written for.

Each showing is a new comparison row (fresh id, its own ``shown_to``), so the one-choice-per-
comparison key holds and a response never tells a labeler which kind of pair they got.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from rlhf.store.errors import InvalidFeedbackError
from rlhf.store.feedback import Comparison, FeedbackStore
from rlhf.store.queries import HAS_CHOICE
from rlhf.store.tables import ANONYMOUS, choices, comparisons, documents, gold_pairs, utcnow

GOLD_SOURCE = "gold"  # documents.source of gold documents; the queue writes no fresh pairs for them
QUEUE_SOURCE = "queue"  # documents.source of documents an admin added for labeling (POST /admin/documents)
GOLD_POLICY = "gold"  # policy_0/policy_1 of a shown gold pair: no policy wrote it
OVERLAP_CANDIDATES = 500  # overlap re-shows one of the newest this many eligible comparisons


@dataclass(frozen=True)
class GoldPair:
    """A pair whose better summary is known (``answer``: 0 or 1), from POST /admin/gold."""

    text: str
    summary_0: str
    summary_1: str
    answer: int
    title: str | None = None


@dataclass(frozen=True)
class QueuedDocument:
    id: str
    text: str
    title: str | None


class LabelingQueue:
    """Picks and records what the queue shows; every choice of pair comes from the caller's rng."""

    def __init__(self, store: FeedbackStore):
        self._store = store

    def add_gold(self, pairs: Sequence[GoldPair]) -> list[str]:
        """Store gold pairs and their documents in one transaction (all or none); the ids of the
        new gold pairs."""
        for pair in pairs:
            if pair.answer not in (0, 1) or isinstance(pair.answer, bool):
                raise InvalidFeedbackError("answer", f"must be 0 or 1, got {pair.answer!r}")
            if pair.summary_0 == pair.summary_1:
                raise InvalidFeedbackError("summary_1", "is identical to summary_0")
        with self._store.write() as conn:
            rows: list[dict[str, Any]] = [
                {"id": str(uuid.uuid4()), "summary_0": pair.summary_0, "summary_1": pair.summary_1,
                 "answer": pair.answer, "created_at": utcnow(),
                 "document_id": self._store.document_in(conn, pair.text, pair.title, GOLD_SOURCE)}
                for pair in pairs
            ]
            if rows:
                conn.execute(gold_pairs.insert(), rows)
        return [row["id"] for row in rows]

    def add_documents(self, texts: Sequence[tuple[str, str | None]]) -> list[str]:
        """Store (text, title) documents for labeling in one transaction; their ids. A text stored
        before keeps its id and is now meant for labeling too (unless it is a gold document)."""
        with self._store.write() as conn:
            ids = [self._store.document_in(conn, text, title, QUEUE_SOURCE) for text, title in texts]
            conn.execute(documents.update().where(documents.c.id.in_(ids), documents.c.source != GOLD_SOURCE)
                         .values(source=QUEUE_SOURCE))
        return ids

    def random_document(self, rng: random.Random, queue_only: bool) -> QueuedDocument | None:
        """A stored document to write a fresh pair for (gold documents never; with ``queue_only``,
        only those an admin added for labeling, never a text someone pasted); None if none."""
        eligible = documents.c.source == QUEUE_SOURCE if queue_only else documents.c.source != GOLD_SOURCE
        with self._store.engine.connect() as conn:
            count = conn.scalar(sa.select(sa.func.count()).select_from(documents).where(eligible))
            if not count:
                return None
            row = conn.execute(
                sa.select(documents.c.id, documents.c.text, documents.c.title).where(eligible)
                .order_by(documents.c.created_at, documents.c.id).offset(rng.randrange(count)).limit(1)
            ).one()
        return QueuedDocument(*row)

    def document(self, document_id: str) -> tuple[str, str | None]:
        """A stored document's text and title, to show beside a re-shown pair."""
        with self._store.engine.connect() as conn:
            text, title = conn.execute(
                sa.select(documents.c.text, documents.c.title).where(documents.c.id == document_id)
            ).one()
        return text, title

    def show_gold(self, labeler: str, rng: random.Random) -> Comparison | None:
        """A random gold pair, in random order, as a new comparison shown to ``labeler``."""
        with self._store.engine.connect() as conn:
            ids = conn.scalars(sa.select(gold_pairs.c.id).order_by(gold_pairs.c.id)).all()
            if not ids:
                return None
            pair = conn.execute(sa.select(gold_pairs).where(gold_pairs.c.id == rng.choice(ids))).one()
        swap = rng.random() < 0.5
        summaries = (pair.summary_1, pair.summary_0) if swap else (pair.summary_0, pair.summary_1)
        return self._show(document_id=pair.document_id, summary_0=summaries[0], summary_1=summaries[1],
                          policy_0=GOLD_POLICY, policy_1=GOLD_POLICY, shown_to=labeler,
                          gold_id=pair.id, gold_answer=1 - pair.answer if swap else pair.answer)

    def show_overlap(self, labeler: str, rng: random.Random, queue_only: bool) -> Comparison | None:
        """A decided pair another identified labeler was shown, again, as a new comparison for
        ``labeler`` (same order, so answers compare index to index); with ``queue_only``, only
        pairs of documents meant for labeling; None if there is none."""
        again = comparisons.alias("again")
        shown_before = sa.exists().where(again.c.overlap_of == comparisons.c.id, again.c.shown_to == labeler)
        of_queue = sa.exists().where(documents.c.id == comparisons.c.document_id,
                                     documents.c.source == QUEUE_SOURCE)
        query = (
            sa.select(comparisons.c.id).join(choices, HAS_CHOICE)
            .where(comparisons.c.shown_to.not_in([labeler, ANONYMOUS]), comparisons.c.gold_id.is_(None),
                   comparisons.c.overlap_of.is_(None), ~shown_before, of_queue if queue_only else sa.true())
            .order_by(comparisons.c.created_at.desc(), comparisons.c.id).limit(OVERLAP_CANDIDATES)
        )
        with self._store.engine.connect() as conn:
            ids = conn.scalars(query).all()
        if not ids:
            return None
        original = self._store.get_comparison(rng.choice(ids))
        return self._show(document_id=original.document_id, summary_0=original.summary_0,
                          summary_1=original.summary_1, policy_0=original.policy_0,
                          policy_1=original.policy_1, shown_to=labeler, overlap_of=original.id)

    def _show(self, **values: object) -> Comparison:
        comparison_id = str(uuid.uuid4())
        with self._store.write() as conn:
            conn.execute(comparisons.insert().values(id=comparison_id, created_at=utcnow(), **values))
        return self._store.get_comparison(comparison_id)

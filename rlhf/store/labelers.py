"""Labelers: who may decide comparisons (hashed bearer tokens), and how far their answers can be
trusted, measured on gold pairs and on pairs shown to two labelers."""

from __future__ import annotations

import hashlib
import secrets
import statistics
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from rlhf.store.errors import InvalidFeedbackError, NotFoundError
from rlhf.store.feedback import FeedbackStore
from rlhf.store.queries import HAS_CHOICE, Tally, window
from rlhf.store.tables import choices, comparisons, labelers, utcnow

MAX_NAME_CHARS = 200


def token_digest(token: str) -> str:
    """What the database keeps of a token: its sha256, so a leaked database grants no access."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Labeler:
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class LabelerStats:
    """GET /admin/labelers: one labeler's volume and quality."""

    labeler_id: str
    name: str
    revoked: bool
    choices: int  # every answer, gold and overlap included
    gold_answered: int
    gold_accuracy: float | None  # None before the first gold answer
    overlap_pairs: int  # decided pairs shown to this and another labeler
    agreement: float | None  # share of those pairs with the same verdict and choice
    cant_tell_share: float | None
    median_decision_s: float | None


class Labelers:
    """The ``labelers`` table and the quality queries over ``choices``; each write one transaction."""

    def __init__(self, store: FeedbackStore):
        self._store = store

    def create(self, name: str) -> tuple[Labeler, str]:
        """A new labeler and its token; only the token's sha256 is stored, so show it once."""
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise InvalidFeedbackError("name", f"must be 1-{MAX_NAME_CHARS} characters, got {name!r}")
        token = secrets.token_urlsafe(32)
        labeler = Labeler(str(uuid.uuid4()), name.strip(), utcnow(), None)
        with self._store.write() as conn:
            conn.execute(labelers.insert().values(
                id=labeler.id, name=labeler.name, token_sha256=token_digest(token),
                created_at=labeler.created_at, revoked_at=None,
            ))
        return labeler, token

    def revoke(self, labeler_id: str) -> Labeler:
        """Refuse the labeler's token from now on; the row and their choices stay."""
        with self._store.write() as conn:
            conn.execute(labelers.update().where(
                labelers.c.id == labeler_id, labelers.c.revoked_at.is_(None)
            ).values(revoked_at=utcnow()))
            found = self._select(conn, labelers.c.id == labeler_id)
        if not found:
            raise NotFoundError("labeler_id", f"no labeler {labeler_id!r}; GET /admin/labelers lists them")
        return found[0]

    def by_token(self, token: str) -> Labeler | None:
        """The labeler holding ``token`` (revoked or not), or None."""
        with self._store.engine.connect() as conn:
            found = self._select(conn, labelers.c.token_sha256 == token_digest(token))
        return found[0] if found else None

    def all(self) -> list[Labeler]:
        with self._store.engine.connect() as conn:
            return self._select(conn, sa.true())

    @staticmethod
    def _select(conn: sa.Connection, where: sa.ColumnElement[bool]) -> list[Labeler]:
        query = sa.select(labelers.c.id, labelers.c.name, labelers.c.created_at, labelers.c.revoked_at)
        return [Labeler(**row) for row in conn.execute(query.where(where).order_by(labelers.c.created_at))
                .mappings()]

    def count_decided(self, labeler: str, since: datetime) -> int:
        """Answers (of any verdict) ``labeler`` recorded after ``since``: the page's daily count."""
        query = sa.select(sa.func.count()).select_from(choices).where(
            choices.c.labeler == labeler, *window(choices.c.decided_at, since, None)
        )
        with self._store.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def gold_scores(self, until: datetime | None = None) -> dict[str, Tally]:
        """Each labeler's gold answers decided up to ``until`` (a cycle's window end, so a resumed
        cycle judges labelers exactly as before)."""
        correct = sa.and_(choices.c.verdict == "preference", choices.c.choice == comparisons.c.gold_answer)
        query = (
            sa.select(choices.c.labeler, sa.func.count(), sa.func.sum(sa.case((correct, 1), else_=0)))
            .join_from(choices, comparisons, HAS_CHOICE)
            .where(comparisons.c.gold_id.is_not(None), *window(choices.c.decided_at, None, until))
            .group_by(choices.c.labeler)
        )
        with self._store.engine.connect() as conn:
            return {labeler: Tally(int(right), n) for labeler, n, right in conn.execute(query)}

    def stats(self) -> list[LabelerStats]:
        """Every labeler's volume, gold accuracy, agreement on overlap pairs, can't-tell share and
        median decision time, oldest labeler first."""
        answers: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
        query = sa.select(choices.c.labeler, choices.c.verdict, choices.c.decision_s)
        with self._store.engine.connect() as conn:
            for labeler, verdict, seconds in conn.execute(query):
                answers[labeler].append((verdict, seconds))
        gold, overlap = self.gold_scores(), self._overlap()
        return [self._stats_of(labeler, answers[labeler.id], gold.get(labeler.id, Tally(0, 0)),
                               overlap[labeler.id]) for labeler in self.all()]

    @staticmethod
    def _stats_of(labeler: Labeler, answers: list[tuple[str, float | None]], gold: Tally,
                  agreed: list[bool]) -> LabelerStats:
        times = [seconds for _, seconds in answers if seconds is not None]
        cant_tell = sum(verdict == "cant_tell" for verdict, _ in answers)
        return LabelerStats(
            labeler_id=labeler.id, name=labeler.name, revoked=labeler.revoked, choices=len(answers),
            gold_answered=gold.total, gold_accuracy=gold.rate, overlap_pairs=len(agreed),
            agreement=sum(agreed) / len(agreed) if agreed else None,
            cant_tell_share=cant_tell / len(answers) if answers else None,
            median_decision_s=statistics.median(times) if times else None,
        )

    def _overlap(self) -> dict[str, list[bool]]:
        """For each labeler, whether they agreed on each decided pair also decided by another: an
        overlap comparison against the one it re-shows (two re-showings are not compared)."""
        shown, original = comparisons.alias("shown"), comparisons.alias("original")
        again, first = choices.alias("again"), choices.alias("first")
        query = (
            sa.select(again.c.labeler, again.c.verdict, again.c.choice,
                      first.c.labeler.label("other"), first.c.verdict.label("other_verdict"),
                      first.c.choice.label("other_choice"))
            .join_from(shown, again, again.c.comparison_id == shown.c.id)
            .join(original, original.c.id == shown.c.overlap_of)
            .join(first, first.c.comparison_id == original.c.id)
            .where(again.c.labeler != first.c.labeler)
        )
        agreed: dict[str, list[bool]] = defaultdict(list)
        with self._store.engine.connect() as conn:
            for row in conn.execute(query):
                # an overlap row shows the summaries in the original's order, so indices compare
                same = (row.verdict, row.choice) == (row.other_verdict, row.other_choice)
                agreed[row.labeler].append(same)
                agreed[row.other].append(same)
        return agreed

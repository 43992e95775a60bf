"""The SELECTs behind the canonical tables, shared by FeedbackStore and the Ray Data source so
that both return the same rows in the same order; and the comparisons joined with their choices."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import sqlalchemy as sa

from rlhf.data.schemas import Schema
from rlhf.store.errors import StoreInputError
from rlhf.store.tables import FEEDBACK_SOURCE, choices, comparisons, documents

_UTC = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Tally:
    """``hits`` of ``total`` decided answers: a labeler's correct gold answers, a version's wins."""

    hits: int
    total: int

    @property
    def rate(self) -> float | None:
        """hits / total; None before any answer."""
        return self.hits / self.total if self.total else None

# FeedbackStore.export_table: everything known about each comparison, for admins and archives.
EXPORT_SCHEMA = pa.schema([
    pa.field("comparison_id", pa.string(), nullable=False),
    pa.field("document_id", pa.string(), nullable=False),
    pa.field("original_text", pa.string(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("summary_0", pa.string(), nullable=False),
    pa.field("summary_1", pa.string(), nullable=False),
    pa.field("policy_0", pa.string(), nullable=False),
    pa.field("policy_1", pa.string(), nullable=False),
    pa.field("created_at", _UTC, nullable=False),
    pa.field("choice", pa.int64()),  # null while pending, like labeler and decided_at
    pa.field("labeler", pa.string()),
    pa.field("decided_at", _UTC),
    pa.field("shown_to", pa.string()),  # labeler id, "anonymous", or null (before schema v4)
    pa.field("overlap_of", pa.string()),
    pa.field("gold_id", pa.string()),
    pa.field("gold_answer", pa.int64()),
    pa.field("verdict", pa.string()),  # preference | both_bad | cant_tell; null while pending
    pa.field("confidence", pa.int64()),
    pa.field("note", pa.string()),
    pa.field("decision_s", pa.float64()),
])


def check_aware(field: str, value: datetime | None) -> None:
    """Reject naive datetimes: the database holds UTC and a naive local time would shift silently."""
    if value is not None and value.utcoffset() is None:
        raise StoreInputError(
            field, f"{value!r} has no time zone; pass an aware datetime, e.g. datetime.now(timezone.utc)"
        )


def window(
    column: sa.ColumnElement[datetime], since: datetime | None, until: datetime | None
) -> list[sa.ColumnElement[bool]]:
    """Conditions for ``since < column <= until``: consecutive windows tile without overlap."""
    check_aware("since", since)
    check_aware("until", until)
    conditions: list[sa.ColumnElement[bool]] = []
    if since is not None:
        conditions.append(column > since)
    if until is not None:
        conditions.append(column <= until)
    return conditions


# A comparison's choice, if any; comparisons are outer-joined with it to include the pending ones.
HAS_CHOICE = choices.c.comparison_id == comparisons.c.id
# Choices training may read: a preferred summary (not both bad / can't tell) on a pair whose answer
# was not known beforehand (gold pairs only score labelers).
TRAINABLE = (choices.c.verdict == "preference", comparisons.c.gold_id.is_(None))
# The answer columns of a choice, after comparisons' own in the Comparison fields and export rows.
_ANSWER = (choices.c.choice, choices.c.labeler, choices.c.decided_at)
_DETAIL = (choices.c.verdict, choices.c.confidence, choices.c.note, choices.c.decision_s)


def comparison_query() -> sa.Select:
    """Comparisons with the columns of their choice (NULL while pending): the Comparison fields."""
    return sa.select(comparisons, *_ANSWER, *_DETAIL).join_from(
        comparisons, choices, HAS_CHOICE, isouter=True
    )


def preference_query(since: datetime | None = None, until: datetime | None = None) -> sa.Select:
    """Trainable choices (TRAINABLE) as PREFERENCE_SCHEMA rows, oldest decision first."""
    decided_at = choices.c.decided_at
    return (
        sa.select(
            documents.c.text.label("original_text"),
            comparisons.c.summary_0,
            comparisons.c.summary_1,
            choices.c.choice,
            sa.literal(FEEDBACK_SOURCE).label("source"),
            comparisons.c.policy_0,
            comparisons.c.policy_1,
        )
        .join_from(comparisons, documents, comparisons.c.document_id == documents.c.id)
        .join(choices, HAS_CHOICE)
        .where(*window(decided_at, since, until), *TRAINABLE)
        .order_by(decided_at, comparisons.c.id)
    )


def export_query(
    include_pending: bool = True, since: datetime | None = None, until: datetime | None = None
) -> sa.Select:
    """Comparisons (with pending ones or without) as EXPORT_SCHEMA rows, oldest first; ``since``
    and ``until`` keep those decided in ``(since, until]`` (and so drop the pending ones)."""
    query = (
        sa.select(
            comparisons.c.id.label("comparison_id"),
            comparisons.c.document_id,
            documents.c.text.label("original_text"),
            documents.c.title,
            comparisons.c.summary_0,
            comparisons.c.summary_1,
            comparisons.c.policy_0,
            comparisons.c.policy_1,
            comparisons.c.created_at,
            *_ANSWER,
            comparisons.c.shown_to,
            comparisons.c.overlap_of,
            comparisons.c.gold_id,
            comparisons.c.gold_answer,
            *_DETAIL,
        )
        .join_from(comparisons, documents, comparisons.c.document_id == documents.c.id)
        .join(choices, HAS_CHOICE, isouter=include_pending)
        .order_by(comparisons.c.created_at, comparisons.c.id)
    )
    return query.where(*window(choices.c.decided_at, since, until))


def prompts_query(since: datetime | None = None, limit: int | None = None) -> sa.Select:
    """Documents as PROMPTS_SCHEMA rows, oldest first."""
    created_at = documents.c.created_at
    return (
        sa.select(documents.c.text.label("original_text"))
        .where(*window(created_at, since, None))
        .order_by(created_at, documents.c.id)
        .limit(limit)
    )


def canonical_query(kind: Schema, since: datetime | None = None) -> sa.Select:
    """The query for one canonical table; the store holds no SFT data."""
    if kind is Schema.PREFERENCE:
        return preference_query(since)
    if kind is Schema.PROMPTS:
        return prompts_query(since)
    raise StoreInputError("kind", f"the feedback store holds no {kind.value!r} table; use "
                                  f"{Schema.PREFERENCE.value!r} or {Schema.PROMPTS.value!r}")


def version_wins_query(version: str) -> sa.Select:
    """One row (wins, decided): ``version``'s /v1/compare comparisons against another version with a
    preference recorded (choice IS NOT NULL), and how many of them people decided for ``version``.
    A version is shown only once published, so these are all decided since it was first served."""
    side_0, side_1 = comparisons.c.policy_0 == version, comparisons.c.policy_1 == version
    won = sa.or_(sa.and_(side_0, choices.c.choice == 0), sa.and_(side_1, choices.c.choice == 1))
    return (
        sa.select(sa.func.coalesce(sa.func.sum(sa.case((won, 1), else_=0)), 0).label("wins"),
                  sa.func.count().label("decided"))
        .select_from(comparisons)
        .join(choices, choices.c.comparison_id == comparisons.c.id)
        .where(sa.or_(side_0, side_1), comparisons.c.policy_0 != comparisons.c.policy_1,
               choices.c.choice.is_not(None))
    )

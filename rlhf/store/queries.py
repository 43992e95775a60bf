"""The SELECTs behind the canonical tables, shared by FeedbackStore and the Ray Data source so
that both return the same rows in the same order."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from rlhf.data.schemas import Schema
from rlhf.store.errors import StoreInputError
from rlhf.store.tables import FEEDBACK_SOURCE, comparisons, documents


def check_aware(field: str, value: datetime | None) -> None:
    """Reject naive datetimes: the database holds UTC and a naive local time would shift silently."""
    if value is not None and value.utcoffset() is None:
        raise StoreInputError(
            field, f"{value!r} has no time zone; pass an aware datetime, e.g. datetime.now(timezone.utc)"
        )


def _window(
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


def preference_query(since: datetime | None = None, until: datetime | None = None) -> sa.Select:
    """Decided comparisons as PREFERENCE_SCHEMA rows, oldest decision first."""
    decided_at = comparisons.c.decided_at
    return (
        sa.select(
            documents.c.text.label("original_text"),
            comparisons.c.summary_0,
            comparisons.c.summary_1,
            comparisons.c.choice,
            sa.literal(FEEDBACK_SOURCE).label("source"),
            comparisons.c.policy_0,
            comparisons.c.policy_1,
        )
        .join_from(comparisons, documents, comparisons.c.document_id == documents.c.id)
        .where(decided_at.is_not(None), *_window(decided_at, since, until))
        .order_by(decided_at, comparisons.c.id)
    )


def prompts_query(since: datetime | None = None, limit: int | None = None) -> sa.Select:
    """Documents as PROMPTS_SCHEMA rows, oldest first."""
    created_at = documents.c.created_at
    return (
        sa.select(documents.c.text.label("original_text"))
        .where(*_window(created_at, since, None))
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

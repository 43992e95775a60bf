"""FeedbackStore: documents, pending comparisons and people's choices, read back as training data."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import sqlalchemy as sa

from rlhf.config.sections import StoreConfig
from rlhf.data.schemas import PREFERENCE_SCHEMA, PROMPTS_SCHEMA
from rlhf.store.connection import WRITE_OPTION, create_engine, resolve_url
from rlhf.store.errors import AlreadyDecidedError, InvalidFeedbackError, NotFoundError
from rlhf.store.queries import (
    EXPORT_SCHEMA,
    HAS_CHOICE,
    TRAINABLE,
    comparison_query,
    export_query,
    preference_query,
    prompts_query,
    window,
)
from rlhf.store.tables import VERDICTS, Verdict, choices, comparisons, create_schema, documents, utcnow


@dataclass(frozen=True)
class Comparison:
    """Two summaries of one document shown to a person, and their answer once made."""

    id: str
    document_id: str
    summary_0: str
    summary_1: str
    policy_0: str  # policy version that wrote summary_0, e.g. "v0003"; "gold" for a gold pair
    policy_1: str
    created_at: datetime  # aware UTC, like decided_at: when it was shown
    choice: int | None  # the index (0 or 1) of the preferred summary; None while pending or not a preference
    labeler: str | None
    decided_at: datetime | None
    shown_to: str | None = None  # labeler id (or ANONYMOUS) it was shown to; None = anyone may decide
    overlap_of: str | None = None  # the comparison it shows again to a second labeler
    gold_id: str | None = None  # the gold pair it shows, with the right answer in the shown order
    gold_answer: int | None = None
    verdict: Verdict | None = None  # None while pending
    confidence: int | None = None  # 1-4, see CONFIDENCE_LEVELS
    note: str | None = None
    decision_s: float | None = None  # seconds from showing to deciding

    @property
    def pending(self) -> bool:
        """No answer recorded yet."""
        return self.decided_at is None


# What each confidence level means: summarize_from_feedback's 1-9 scale (1 = surely A, 5 = no
# preference, 9 = surely B) folded at its middle, whose "no preference" is our cant_tell verdict:
# level k is their 5 - k or 5 + k.
CONFIDENCE_LEVELS = {
    1: "a guess: the chosen summary is barely better (their 4 or 6)",
    2: "somewhat sure (3 or 7)",
    3: "fairly sure (2 or 8)",
    4: "certain: the other summary is clearly worse (1 or 9)",
}
MAX_NOTE_CHARS = 2000  # a note is a remark for admins, not a document


# NUL (PostgreSQL refuses it in text) and lone UTF-16 surrogates (no UTF-8 form): valid Python
# strings that are not storable text.
NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def _require_text(field: str, value: str) -> None:
    """Empty texts would become empty training rows, and NUL or a lone surrogate fails on one of
    the databases: refuse them at the door, alike on both."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidFeedbackError(field, f"must be a non-empty string, got {value!r}")
    check_storable(field, value)


def check_storable(field: str, value: str | None) -> None:
    """InvalidFeedbackError when ``value`` holds NUL or a lone surrogate."""
    if value is not None and (bad := NOT_TEXT.search(value)):
        raise InvalidFeedbackError(field, f"holds U+{ord(bad.group()):04X}, which is not text; send "
                                          "valid Unicode without NUL")


def _check_choice(choice: int | None, verdict: Verdict) -> None:
    """A preference needs an index into (summary_0, summary_1), the other verdicts none; booleans are
    refused as ambiguous."""
    if verdict not in VERDICTS:
        raise InvalidFeedbackError("verdict", f"must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    if verdict != "preference":
        if choice is not None:
            raise InvalidFeedbackError("choice", f"must be null for verdict {verdict!r} (no summary is "
                                                 "preferred); send verdict 'preference' to pick one")
    elif isinstance(choice, bool) or choice not in (0, 1):
        raise InvalidFeedbackError(
            "choice", f"must be 0 or 1 (the index of the preferred summary), got {choice!r}"
        )


def _check_extras(confidence: int | None, note: str | None) -> None:
    if confidence is not None and (isinstance(confidence, bool) or confidence not in CONFIDENCE_LEVELS):
        raise InvalidFeedbackError("confidence", f"must be 1-4 or null, got {confidence!r}")
    check_storable("note", note)
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidFeedbackError("note", f"{len(note)} characters is over the {MAX_NOTE_CHARS}-character "
                                           "limit; shorten the note")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _new_id() -> str:
    return str(uuid.uuid4())


class FeedbackStore:
    """The feedback database: SQLite file by default, PostgreSQL on clusters.

    Every write is one committed transaction before the method returns, so a choice acknowledged
    to the web page survives a crash. Several instances (threads, processes) may share a database.
    """

    def __init__(self, url: str):
        """Open (and on first use create) the database at ``url``; ``${VAR}`` parts are expanded
        from the environment here, so secrets stay out of config files."""
        self._engine = create_engine(resolve_url(url))
        create_schema(self._engine)

    @classmethod
    def from_config(cls, config: StoreConfig) -> FeedbackStore:
        """The store named by a job's ``store`` config section."""
        return cls(config.url)

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine, for admin queries and for building readers on other processes."""
        return self._engine

    def close(self) -> None:
        """Close pooled connections (the store must not be used afterwards)."""
        self._engine.dispose()

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """One write transaction, committed on leaving the block (see engine._begin_sqlite); for
        the store's methods and the online loop's ledger (rlhf.store.cycles)."""
        with self._engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
            yield conn

    def add_document(self, text: str, title: str | None = None, source: str = "paste") -> str:
        """Store a document and return its id; the same text again returns the first id (the
        first title and source are kept), so repeated pastes do not weight PPO prompts."""
        try:
            with self.write() as conn:
                return self.document_in(conn, text, title, source)
        except sa.exc.IntegrityError:
            # PostgreSQL only (SQLite writers are serialised): a concurrent call stored it first.
            with self._engine.connect() as conn:
                document_id = self._document_id(conn, _digest(text))
            assert document_id is not None, "the insert that refused ours committed this text"
            return document_id

    def document_in(self, conn: sa.Connection, text: str, title: str | None, source: str) -> str:
        """``add_document`` inside the caller's write transaction (several documents and the rows
        that name them commit together, or none do)."""
        _require_text("text", text)
        check_storable("title", title)
        digest = _digest(text)
        return self._document_id(conn, digest) or self._insert_document(conn, text, digest, title, source)

    @staticmethod
    def _document_id(conn: sa.Connection, digest: str) -> str | None:
        return conn.scalar(sa.select(documents.c.id).where(documents.c.text_sha256 == digest))

    @staticmethod
    def _insert_document(conn: sa.Connection, text: str, digest: str, title: str | None, source: str) -> str:
        document_id = _new_id()
        conn.execute(documents.insert().values(
            id=document_id, text=text, text_sha256=digest, title=title, source=source, created_at=utcnow()
        ))
        return document_id

    def create_comparison(
        self, document_id: str, summary_0: str, summary_1: str, policy_0: str, policy_1: str,
        shown_to: str | None = None,
    ) -> str:
        """Store a pending comparison of two different summaries of a stored document, shown to the
        labeler ``shown_to`` (only they may decide it; None = anyone, for scripts)."""
        for field, value in (("summary_0", summary_0), ("summary_1", summary_1),
                             ("policy_0", policy_0), ("policy_1", policy_1)):
            _require_text(field, value)
        if summary_0 == summary_1:
            raise InvalidFeedbackError("summary_1", "is identical to summary_0; a comparison needs two "
                                                    "different summaries (reward training drops ties)")
        comparison_id = _new_id()
        with self.write() as conn:
            if conn.scalar(sa.select(documents.c.id).where(documents.c.id == document_id)) is None:
                raise NotFoundError("document_id", f"no document {document_id!r}; store it with "
                                                   "add_document() first and pass the id it returns")
            conn.execute(comparisons.insert().values(
                id=comparison_id, document_id=document_id, summary_0=summary_0, summary_1=summary_1,
                policy_0=policy_0, policy_1=policy_1, created_at=utcnow(), shown_to=shown_to,
            ))
        return comparison_id

    def record_choice(
        self, comparison_id: str, choice: int | None, labeler: str | None = None,
        verdict: Verdict = "preference", confidence: int | None = None, note: str | None = None,
    ) -> Comparison:
        """Record a labeler's answer (a preferred summary, or both bad / can't tell); committed before
        returning, with the seconds since the comparison was shown.

        A comparison shown to another labeler answers NotFoundError, exactly as an unknown id, so
        ids cannot be probed. Sending the same answer again (a retried HTTP request) returns the
        stored comparison; any other answer for a decided comparison, even one that differs only in
        confidence or note, raises AlreadyDecidedError: a decision is stored once, as first sent.
        """
        check_storable("comparison_id", comparison_id)
        _check_choice(choice, verdict)
        _check_extras(confidence, note)
        try:
            with self.write() as conn:
                # On SQLite this read holds the write lock (BEGIN IMMEDIATE), so no other choice can
                # come between it and the insert.
                stored = self._comparison(conn, comparison_id)
                if stored is not None and stored.shown_to not in (None, labeler):
                    stored = None
                if stored is not None and stored.pending:
                    now = utcnow()
                    conn.execute(choices.insert().values(
                        comparison_id=comparison_id, choice=choice, labeler=labeler, decided_at=now,
                        verdict=verdict, confidence=confidence, note=note,
                        decision_s=(now - stored.created_at).total_seconds(),
                    ))
                    stored = self._comparison(conn, comparison_id)
        except sa.exc.IntegrityError:
            # PostgreSQL: a concurrent request inserted its choice after our read; the primary key
            # refused ours, so read the winner.
            with self._engine.connect() as conn:
                stored = self._comparison(conn, comparison_id)
        if stored is None:
            raise NotFoundError("comparison_id", f"no comparison {comparison_id!r}; use the id that "
                                                 "create_comparison() (POST /v1/compare) returned")
        answer = (verdict, choice, confidence, note)
        if (stored.verdict, stored.choice, stored.confidence, stored.note) != answer:
            # A pending comparison got our choice above (or a concurrent one), so it is decided now.
            assert stored.decided_at is not None
            decided = stored.choice if stored.verdict == "preference" else stored.verdict
            raise AlreadyDecidedError(
                "choice", f"comparison {comparison_id!r} was already decided as {decided} (confidence "
                f"{stored.confidence}, note {'set' if stored.note else 'none'}) at "
                f"{stored.decided_at.isoformat()}; a decision cannot change, create a new comparison"
            )
        return stored

    @staticmethod
    def _comparison(conn: sa.Connection, comparison_id: str) -> Comparison | None:
        row = conn.execute(comparison_query().where(comparisons.c.id == comparison_id)).one_or_none()
        return None if row is None else Comparison(**row._mapping)

    def get_comparison(self, comparison_id: str) -> Comparison:
        """One comparison, pending or decided."""
        with self._engine.connect() as conn:
            stored = self._comparison(conn, comparison_id)
        if stored is None:
            raise NotFoundError("comparison_id", f"no comparison {comparison_id!r}")
        return stored

    def count_decided(self, since: datetime | None = None, until: datetime | None = None) -> int:
        """How many trainable choices (preferences on non-gold comparisons) were recorded in
        ``(since, until]`` (None = unbounded): the online loop's trigger."""
        decided = window(choices.c.decided_at, since, until)
        query = sa.select(sa.func.count()).select_from(comparisons.join(choices, HAS_CHOICE)).where(
            *decided, *TRAINABLE
        )
        with self._engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def count_comparisons(self, pending: bool | None = None) -> int:
        """How many comparisons there are: all (None), only pending (True) or only decided (False);
        for the admin page's progress counts."""
        query = sa.select(sa.func.count()).select_from(comparisons.outerjoin(choices))
        if pending is not None:
            decided = choices.c.comparison_id
            query = query.where(decided.is_(None) if pending else decided.is_not(None))
        with self._engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def latest_decided_at(self) -> datetime | None:
        """When the newest choice was recorded: pass it as ``since`` next time to read only new rows.

        On PostgreSQL two choices recorded at once may commit in the opposite order of their
        timestamps, so a reader right in between can miss the earlier one; read with
        ``until=now - a few seconds`` where that matters.
        """
        with self._engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.max(choices.c.decided_at)))

    def comparisons_table(self, since: datetime | None = None, until: datetime | None = None) -> pa.Table:
        """Choices recorded in ``(since, until]`` as PREFERENCE_SCHEMA rows, oldest first."""
        return self._table(preference_query(since, until), PREFERENCE_SCHEMA)

    def documents_table(self, limit: int | None = None, since: datetime | None = None) -> pa.Table:
        """Documents (created after ``since``) as PROMPTS_SCHEMA rows for PPO, oldest first."""
        return self._table(prompts_query(since, limit), PROMPTS_SCHEMA)

    def export_table(
        self, include_pending: bool = True, since: datetime | None = None, until: datetime | None = None
    ) -> pa.Table:
        """Every comparison with its document and choice (EXPORT_SCHEMA), oldest first: the admin
        export, which unlike comparisons_table keeps ids, labelers, times and pending comparisons.
        ``since``/``until`` keep the choices recorded in ``(since, until]``."""
        return self._table(export_query(include_pending, since, until), EXPORT_SCHEMA)

    def _table(self, query: sa.Select, schema: pa.Schema) -> pa.Table:
        with self._engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        return pa.Table.from_pylist(rows, schema=schema)

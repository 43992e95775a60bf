"""rlhf.store against real databases: a SQLite file and a throwaway PostgreSQL server."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime

import pyarrow as pa
import pytest
import sqlalchemy as sa

from rlhf.data.schemas import PREFERENCE_SCHEMA, PROMPTS_SCHEMA, Schema
from rlhf.errors import InputError
from rlhf.store import (
    AlreadyDecidedError,
    Comparison,
    FeedbackStore,
    InvalidFeedbackError,
    NotFoundError,
    StoreInputError,
    feedback_dataset,
)
from rlhf.store.connection import _enable_wal
from rlhf.store.queries import EXPORT_SCHEMA

POLICIES = ("v0001", "v0002")


def _decide(store: FeedbackStore, text: str, choice: int, policies: tuple[str, str] = POLICIES) -> str:
    """Add a document and one comparison of it, record ``choice``; return the comparison id."""
    document_id = store.add_document(text)
    comparison_id = store.create_comparison(document_id, f"{text} A", f"{text} B", *policies)
    store.record_choice(comparison_id, choice, labeler="tester")
    return comparison_id


def _row(text: str, choice: int, policies: tuple[str, str] = POLICIES) -> dict:
    return {"original_text": text, "summary_0": f"{text} A", "summary_1": f"{text} B", "choice": choice,
            "source": "feedback", "policy_0": policies[0], "policy_1": policies[1]}


def test_round_trip_gives_canonical_preference_rows_in_decision_order(store: FeedbackStore):
    doc = store.add_document("first document", title="T", source="pdf")
    late = store.create_comparison(doc, "first document A", "first document B", "v0001", "v0002")
    pending = store.create_comparison(doc, "x", "y", "v0001", "v0002")
    _decide(store, "second document", 0, ("v0003", "v0001"))
    decided = store.record_choice(late, 1, labeler="ann")  # created first, decided last

    assert decided.choice == 1 and decided.labeler == "ann" and not decided.pending
    assert decided.decided_at.tzinfo is not None and decided.decided_at >= decided.created_at
    assert store.get_comparison(pending).pending
    table = store.comparisons_table()
    assert table.schema == PREFERENCE_SCHEMA
    assert table.to_pylist() == [_row("second document", 0, ("v0003", "v0001")), _row("first document", 1)]
    assert store.count_decided() == 2
    assert store.latest_decided_at() == decided.decided_at


def test_since_and_until_split_decisions_into_windows(store: FeedbackStore):
    assert store.latest_decided_at() is None
    _decide(store, "old", 0)
    cursor = store.latest_decided_at()
    _decide(store, "new", 1)

    assert store.comparisons_table(since=cursor).to_pylist() == [_row("new", 1)]
    assert store.comparisons_table(until=cursor).to_pylist() == [_row("old", 0)]
    assert store.count_decided(since=cursor) == 1
    assert store.comparisons_table(since=store.latest_decided_at()).num_rows == 0
    with pytest.raises(StoreInputError, match="since: .* no time zone"):
        store.comparisons_table(since=datetime(2024, 1, 1))


def test_identical_documents_are_stored_once(store: FeedbackStore):
    first = store.add_document("same text", title="one")
    assert store.add_document("same text", title="two", source="import") == first
    store.add_document("other text")

    table = store.documents_table()
    assert table.schema == PROMPTS_SCHEMA
    assert table.column("original_text").to_pylist() == ["same text", "other text"]
    assert store.documents_table(limit=1).num_rows == 1


def test_bad_input_raises_errors_that_name_the_field(store: FeedbackStore):
    doc = store.add_document("a document")
    comparison = store.create_comparison(doc, "s0", "s1", "v0001", "v0002")

    with pytest.raises(NotFoundError, match="comparison_id: no comparison 'nope'; use the id"):
        store.record_choice("nope", 0)
    with pytest.raises(NotFoundError, match="comparison_id"):
        store.get_comparison("nope")
    with pytest.raises(NotFoundError, match="document_id: no document 'nope'; store it with add_document"):
        store.create_comparison("nope", "s0", "s1", "v0001", "v0002")
    for bad in (2, -1, True):
        with pytest.raises(InvalidFeedbackError, match="choice: must be 0 or 1"):
            store.record_choice(comparison, bad)
    with pytest.raises(InvalidFeedbackError, match="summary_1: is identical to summary_0"):
        store.create_comparison(doc, "same", "same", "v0001", "v0002")
    with pytest.raises(InvalidFeedbackError, match="text: must be a non-empty string"):
        store.add_document("  ")
    assert store.get_comparison(comparison).pending  # nothing above touched it
    assert issubclass(StoreInputError, InputError)


def test_a_resent_choice_is_idempotent_and_a_different_one_refused(store: FeedbackStore):
    comparison = store.create_comparison(store.add_document("doc"), "s0", "s1", "v0001", "v0002")
    first = store.record_choice(comparison, 1, labeler="ann")

    assert store.record_choice(comparison, 1, labeler="bob") == first
    with pytest.raises(AlreadyDecidedError, match="choice: comparison .* already decided as 1"):
        store.record_choice(comparison, 0)
    assert store.get_comparison(comparison) == first
    assert store.count_decided() == 1


def test_a_recorded_choice_is_visible_to_a_new_store(url: str, store: FeedbackStore):
    comparison = _decide(store, "durable", 1)
    reopened = FeedbackStore(url)
    assert reopened.get_comparison(comparison).choice == 1
    reopened.close()


def test_sqlite_commits_are_durable_and_visible_to_another_process(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path}/feedback.db")
    comparison = _decide(store, "durable", 1)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: fsync at each commit
    # A plain sqlite3 reader in another process, while the store's connections stay open.
    reader = "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(" \
             "'SELECT choice FROM choices WHERE comparison_id = ?', (sys.argv[2],)).fetchone()[0])"
    out = subprocess.run([sys.executable, "-c", reader, str(tmp_path / "feedback.db"), comparison],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
    store.close()


def test_concurrent_stores_lose_no_choice(url: str):
    """Four threads, each with its own store opened at the same moment on a new database, add the
    same document at once and record 50 choices in all: no lock errors, no lost or duplicated rows.
    """
    threads, per_thread = 4, 13  # 52 comparisons, the last 2 stay pending
    barrier = threading.Barrier(threads, timeout=60)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait()
            store = FeedbackStore(url)
            barrier.wait()  # and race to insert the same document
            doc = store.add_document("shared document")
            for i in range(per_thread):
                summaries = f"w{worker} s{i} A", f"w{worker} s{i} B"
                comparison = store.create_comparison(doc, *summaries, *POLICIES)
                if worker * per_thread + i < 50:
                    store.record_choice(comparison, i % 2, labeler=f"w{worker}")
            store.close()
        except BaseException as exc:  # reported by the main thread
            barrier.abort()  # so the other threads stop waiting for this one
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(worker,)) for worker in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    store = FeedbackStore(url)
    rows = store.comparisons_table().to_pylist()
    assert store.count_decided() == len(rows) == 50
    assert len({row["summary_0"] for row in rows}) == 50
    assert all(row["choice"] == int(row["summary_0"].split()[1][1:]) % 2 for row in rows)
    assert store.documents_table().num_rows == 1
    store.close()


def test_env_vars_in_the_url_are_expanded(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RLHF_TEST_DIR", str(tmp_path))
    store = FeedbackStore("sqlite:///${RLHF_TEST_DIR}/nested/feedback.db")
    assert store.engine.url.database == str(tmp_path / "nested" / "feedback.db")
    assert (tmp_path / "nested" / "feedback.db").exists()
    store.close()

    monkeypatch.delenv("RLHF_TEST_UNSET", raising=False)
    with pytest.raises(StoreInputError, match=r"store.url: uses \$\{RLHF_TEST_UNSET\} but .* is not set"):
        FeedbackStore("postgresql+psycopg://user:${RLHF_TEST_UNSET}@localhost/db")


def test_a_password_from_the_environment_needs_no_url_escaping(postgres_url: str, monkeypatch):
    monkeypatch.setenv("RLHF_TEST_PASSWORD", "p@ss/w:rd%")
    url = sa.make_url(postgres_url)
    store = FeedbackStore(f"postgresql+psycopg://postgres:${{RLHF_TEST_PASSWORD}}@{url.host}:{url.port}/rlhf")
    assert store.engine.url.password == "p@ss/w:rd%"
    assert store.count_decided() == 0  # connected (the test server trusts any password)
    store.close()


def test_switching_a_new_sqlite_file_to_wal_retries_while_it_is_locked():
    """Connections opening a new file at once get "database is locked" without waiting; see _enable_wal."""

    class Cursor:
        def __init__(self, error: str):
            self.error, self.calls = error, 0

        def execute(self, sql: str) -> None:
            self.calls += 1
            if self.calls < 3:
                raise sqlite3.OperationalError(self.error)

    locked = Cursor("database is locked")
    _enable_wal(locked)
    assert locked.calls == 3
    broken = Cursor("disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        _enable_wal(broken)
    assert broken.calls == 1


def test_a_relative_sqlite_path_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = FeedbackStore("sqlite:///data/feedback.db")
    assert store.engine.url.database == str(tmp_path / "data" / "feedback.db")
    store.close()


def test_a_database_of_another_schema_version_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/feedback.db"
    store = FeedbackStore(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE schema_version SET version = 99")
    store.close()
    with pytest.raises(StoreInputError, match="store.url: database schema version 99"):
        FeedbackStore(url)


@pytest.mark.usefixtures("ray_local")
def test_the_ray_dataset_returns_the_same_rows_as_the_tables(url: str, store: FeedbackStore):
    _decide(store, "old", 0)
    cursor = store.latest_decided_at()
    _decide(store, "new", 1, ("v0003", "v0002"))
    store.create_comparison(store.add_document("pending"), "p0", "p1", "v1", "v2")

    preferences = feedback_dataset(url, Schema.PREFERENCE)
    assert preferences.schema().base_schema == PREFERENCE_SCHEMA
    assert preferences.take_all() == store.comparisons_table().to_pylist()
    newer = feedback_dataset(url, Schema.PREFERENCE, since=cursor)
    assert newer.take_all() == [_row("new", 1, ("v0003", "v0002"))]
    assert feedback_dataset(url, Schema.PROMPTS).take_all() == store.documents_table().to_pylist()
    with pytest.raises(StoreInputError, match="kind: the feedback store holds no 'sft' table"):
        feedback_dataset(url, Schema.SFT)


def test_a_choice_stored_between_the_read_and_the_insert_wins(store: FeedbackStore, monkeypatch):
    """The race that PostgreSQL allows: another request inserts its choice after record_choice read
    the comparison as pending; the primary key refuses the second insert and the first choice wins."""
    comparison = store.create_comparison(store.add_document("doc"), "s0", "s1", "v0001", "v0002")
    winner = store.record_choice(comparison, 1, labeler="ann")
    read = FeedbackStore._comparison
    reads: list[Comparison] = []

    def stale_first_read(conn: sa.Connection, comparison_id: str) -> Comparison | None:
        reads.append(read(conn, comparison_id))
        pending = dataclasses.replace(reads[-1], choice=None, labeler=None, decided_at=None)
        return pending if len(reads) == 1 else reads[-1]

    monkeypatch.setattr(FeedbackStore, "_comparison", staticmethod(stale_first_read))
    assert store.record_choice(comparison, 1, labeler="bob") == winner
    reads.clear()
    with pytest.raises(AlreadyDecidedError, match="already decided as 1"):
        store.record_choice(comparison, 0)
    assert store.get_comparison(comparison) == winner
    assert store.count_decided() == 1


def test_racing_choices_for_one_comparison_keep_exactly_one(url: str, store: FeedbackStore):
    """Four stores record different choices for one comparison at once: one wins, the requests with
    its choice get it back, the others get AlreadyDecidedError."""
    comparison = store.create_comparison(store.add_document("contested"), "s0", "s1", "v0001", "v0002")
    workers = 4
    barrier = threading.Barrier(workers, timeout=60)
    results: dict[int, Comparison | BaseException] = {}

    def work(worker: int) -> None:
        racer = FeedbackStore(url)
        try:
            barrier.wait()
            results[worker] = racer.record_choice(comparison, worker % 2, labeler=f"w{worker}")
        except BaseException as exc:  # checked by the main thread
            results[worker] = exc
        finally:
            racer.close()

    pool = [threading.Thread(target=work, args=(worker,)) for worker in range(workers)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    stored = store.get_comparison(comparison)
    for worker, result in results.items():
        if worker % 2 == stored.choice:
            assert result == stored
        else:
            assert isinstance(result, AlreadyDecidedError)
    assert len(results) == workers and store.count_decided() == 1


def test_count_comparisons_splits_pending_and_decided(store: FeedbackStore):
    assert store.count_comparisons() == 0
    doc = store.add_document("counted")
    created = [store.create_comparison(doc, f"s{i} A", f"s{i} B", *POLICIES) for i in range(3)]
    store.record_choice(created[1], 0)

    assert store.count_comparisons() == 3
    assert store.count_comparisons(pending=True) == 2
    assert store.count_comparisons(pending=False) == 1


def test_export_table_has_every_comparison_with_its_document_and_choice(store: FeedbackStore):
    assert store.export_table().schema == EXPORT_SCHEMA  # typed even when empty
    titled = store.add_document("exported", title="A title")
    untitled = store.add_document("untitled", source="pdf")
    first = store.create_comparison(untitled, "u0", "u1", "v0003", "v0004")
    second = store.create_comparison(titled, "e0", "e1", "v0001", "v0002")
    decided = store.record_choice(second, 0, labeler="ann")
    pending = store.get_comparison(first)

    def row(comparison: Comparison, text: str, title: str | None) -> dict:
        fields = dataclasses.asdict(comparison)
        return {"comparison_id": fields.pop("id"), "original_text": text, "title": title, **fields}

    table = store.export_table()
    assert table.schema == EXPORT_SCHEMA
    assert table.schema.field("decided_at").type == pa.timestamp("us", tz="UTC")
    assert table.to_pylist() == [row(pending, "untitled", None), row(decided, "exported", "A title")]
    assert store.export_table(include_pending=False).to_pylist() == [row(decided, "exported", "A title")]

"""The online loop's window reading keeps only choices of labelers the gold pairs trust, on real
SQLite and PostgreSQL stores (no Ray): read_window and the loop's window step, with the counts each
cycle records."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from rlhf.config.core import load_config
from rlhf.online.config import OnlineConfig
from rlhf.online.loop import OnlineLoop
from rlhf.online.window import LabelerRule, read_window
from rlhf.store import CycleLog, CycleRecord, FeedbackStore
from rlhf.store.labelers import Labelers
from rlhf.store.queue import GoldPair, LabelingQueue
from rlhf.store.tables import ANONYMOUS, utcnow


def _answer_gold(store: FeedbackStore, labeler: str, right: int, wrong: int, rng: random.Random) -> None:
    queue = LabelingQueue(store)
    for k in range(right + wrong):
        shown = queue.show_gold(labeler, rng)
        store.record_choice(shown.id, shown.gold_answer if k < right else 1 - shown.gold_answer, labeler)


def _prefer(store: FeedbackStore, labeler: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        document = store.add_document(f"{labeler} document {i}")
        comparison = store.create_comparison(document, f"{labeler} {i} A", f"{labeler} {i} B", "v0001",
                                             "v0002", shown_to=labeler)
        store.record_choice(comparison, i % 2, labeler)
        ids.append(comparison)
    return ids


@pytest.fixture
def labelled(store: FeedbackStore) -> dict[str, list[str]]:
    """Trusted (5/5 gold), sloppy (1/5), new (1 gold answer) and anonymous labelers' preferences,
    plus a both-bad verdict that no window may read; the comparison ids of each labeler's preferences."""
    labelers, rng = Labelers(store), random.Random(0)
    LabelingQueue(store).add_gold([GoldPair(f"gold {i}", f"right {i}", f"wrong {i}", i % 2)
                                   for i in range(3)])
    people = {name: labelers.create(name)[0].id for name in ("trusted", "sloppy", "new")}
    _answer_gold(store, people["trusted"], 5, 0, rng)
    _answer_gold(store, people["sloppy"], 1, 4, rng)
    _answer_gold(store, people["new"], 1, 0, rng)
    shown = {name: _prefer(store, labeler, 3) for name, labeler in people.items()}
    shown["anonymous"] = _prefer(store, ANONYMOUS, 2)
    unsure = store.create_comparison(store.add_document("unsure"), "u A", "u B", "v0001", "v0002")
    store.record_choice(unsure, None, people["trusted"], verdict="both_bad")
    return shown


def _window_ids(store: FeedbackStore, rule: LabelerRule):
    window = read_window(store, None, utcnow() + timedelta(seconds=1), 0.0, 0.0, seed=0, labelers=rule)
    assert window.new.num_rows == len(window.new_ids)
    return window, set(window.new_ids)


def test_without_a_threshold_every_preference_trains_but_never_gold_or_verdicts(store, labelled):
    window, ids = _window_ids(store, LabelerRule())
    assert ids == {i for shown in labelled.values() for i in shown}  # 11 preferences, no gold rows
    assert (window.excluded_low_gold_accuracy, window.excluded_unscored) == (0, 0)


def test_a_labeler_below_the_gold_threshold_is_left_out_and_counted(store, labelled):
    window, ids = _window_ids(store, LabelerRule(min_gold_accuracy=0.8, min_gold_answers=3, unscored="keep"))
    assert ids == set(labelled["trusted"] + labelled["new"] + labelled["anonymous"])
    assert (window.excluded_low_gold_accuracy, window.excluded_unscored) == (3, 0)
    window, ids = _window_ids(store, LabelerRule(min_gold_accuracy=0.8, min_gold_answers=3, unscored="hold"))
    assert ids == set(labelled["trusted"])
    assert (window.excluded_low_gold_accuracy, window.excluded_unscored) == (3, 5)


def test_the_loops_window_step_applies_the_feedback_keys_and_records_the_counts(store, labelled, url,
                                                                                tmp_path):
    cfg = load_config(OnlineConfig, None, [
        f"store.url={url}", f"output_dir={tmp_path / 'online'}", f"registry={tmp_path / 'registry'}",
        "feedback.min_gold_accuracy=0.5", "feedback.min_gold_answers=2", "feedback.unscored_labelers=hold",
        "feedback.holdout_fraction=0", "feedback.settle_s=0",
    ])
    loop = OnlineLoop(cfg)
    record = CycleRecord(watermark_since=None, watermark_until=utcnow().isoformat(), policy_before="p",
                         reward_before="r")
    cycle = CycleLog(store).start(1, None, utcnow(), record)
    window = loop.context.window(cycle)
    assert set(window.new_ids) == set(labelled["trusted"])
    assert (window.excluded_low_gold_accuracy, window.excluded_unscored) == (3, 5)
    logged = CycleRecord(**{**record.to_record(), "excluded_low_gold_accuracy": 3, "excluded_unscored": 5})
    assert CycleRecord.from_record(logged.to_record()) == logged
    loop.store.close()

"""The health numbers behind the online loop's records and its publish guard, against values worked
out by hand; the probe and a cycle's reward-model health on a real store with a tiny reward model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.online import label_choices

from rlhf.config.sections import ModelConfig
from rlhf.eval.health import (
    average_ranks,
    calibration_error,
    mean_repetition,
    repetition,
    score_drift,
    unfinished_share,
)
from rlhf.models import load_reward_model
from rlhf.online.scorer_health import ScorerHealth, load_probe, measure, with_health
from rlhf.online.window import read_window
from rlhf.store import CycleRecord, FeedbackStore
from rlhf.store.tables import utcnow


def test_calibration_error_by_hand() -> None:
    probabilities, outcomes = [0.1, 0.4, 0.8, 0.9], [0, 1, 1, 0]
    # two bins: [0.1, 0.4] mean p 0.25 vs outcome 0.5; [0.8, 0.9] mean p 0.85 vs 0.5 -> (0.25 + 0.35) / 2
    assert calibration_error(probabilities, outcomes, bins=2) == pytest.approx(0.3)
    # one bin: |mean p 0.55 - mean outcome 0.5|
    assert calibration_error(probabilities, outcomes, bins=1) == pytest.approx(0.05)
    # ten bins: every pair alone, |p - outcome| averaged: (0.1 + 0.6 + 0.2 + 0.9) / 4
    assert calibration_error(probabilities, outcomes, bins=10) == pytest.approx(0.45)
    assert calibration_error([0.5, 0.5, 1.0], [0, 1, 1], bins=10) == pytest.approx(0.0)  # 1.0: last bin
    assert calibration_error([], [], bins=10) == 0.0


def test_calibration_error_does_not_depend_on_the_order_a_pair_was_shown() -> None:
    probabilities, outcomes = [0.15, 0.35, 0.7, 0.95, 0.6], [0, 1, 1, 1, 0]
    swapped = [1 - p for p in probabilities], [1 - o for o in outcomes]
    assert calibration_error(*swapped, bins=4) == pytest.approx(calibration_error(probabilities, outcomes, 4))


def test_calibration_error_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bins must be >= 1"):
        calibration_error([0.5], [1], bins=0)
    with pytest.raises(ValueError):
        calibration_error([0.5, 0.2], [1], bins=2)


def test_score_drift_is_one_minus_spearman() -> None:
    before = [1.0, 2.0, 3.0, 4.0]
    assert score_drift(before, [10.0, 20.0, 30.0, 40.0]) == pytest.approx(0.0)  # rescaled: same order
    assert score_drift(before, [-1.0, -2.0, -3.0, -4.0]) == pytest.approx(2.0)  # reversed
    # ranks (1, 3, 2, 4): d² sums to 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert score_drift(before, [0.1, 5.0, 0.2, 9.0]) == pytest.approx(0.2)
    assert score_drift(before, [7.0, 7.0, 7.0, 7.0]) == pytest.approx(1.0)  # a constant model has no order


def test_average_ranks_share_ties() -> None:
    assert average_ranks([5.0, 1.0, 5.0]) == [2.5, 1.0, 2.5]
    assert average_ranks([3.0, 3.0, 3.0, 0.0]) == [3.0, 3.0, 3.0, 1.0]


def test_repetition_counts_repeated_word_ngrams() -> None:
    assert repetition("a b a b a b", 2) == pytest.approx(0.6)  # 5 bigrams, 2 distinct
    assert repetition("the cat sat on the mat", 2) == 0.0
    assert repetition("go go go go", 1) == pytest.approx(0.75)
    assert repetition("too short", 3) == 0.0
    assert mean_repetition(["a b a b a b", "the cat sat"], 2) == pytest.approx(0.3)
    assert mean_repetition([], 2) == 0.0


def test_unfinished_share_counts_summaries_without_eos() -> None:
    assert unfinished_share([True, False, False, True]) == 0.5
    assert unfinished_share([]) == 0.0


def test_the_probe_is_chosen_once_and_a_cycle_records_calibration_and_drift(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path}/feedback.db")
    label_choices(store, 16)
    middle = utcnow()
    label_choices(store, 8, offset=16)
    first = read_window(store, None, middle, 0.5, 1.0, seed=1)  # none held out: odds 2**-16
    path = tmp_path / "online" / "probe.jsonl"
    probe = load_probe(path, first, size=6)
    held = first.holdout.to_pylist()[0]
    assert probe.num_rows == 6 and probe.to_pylist()[:2] == [
        {"original_text": held["original_text"], "summary": held["summary_0"]},
        {"original_text": held["original_text"], "summary": held["summary_1"]},
    ]  # held-out comparisons first: never trained on
    later = read_window(store, middle, utcnow(), 0.5, 1.0, seed=2)
    assert load_probe(path, later, size=6).equals(probe)  # every later cycle scores the same pairs

    model = load_reward_model(ModelConfig(name_or_path="tiny-gpt2", max_source_length=64)).eval()
    health = measure(model, first.holdout, probe, "quality", bins=5, batch_size=4)
    rows = first.holdout.to_pydict()
    s0 = model.score(rows["original_text"], rows["summary_0"], "quality")
    s1 = model.score(rows["original_text"], rows["summary_1"], "quality")
    expected = calibration_error(torch.sigmoid(s1 - s0).tolist(), rows["choice"], 5)
    assert health.calibration_error == pytest.approx(expected, abs=1e-4)
    correct = [(a > b) == bool(c) for a, b, c in zip(s1.tolist(), s0.tolist(), rows["choice"])]
    assert health.accuracy == round(sum(correct) / len(correct), 4)
    assert health.probe_scores == pytest.approx(
        model.score(probe["original_text"].to_pylist(), probe["summary"].to_pylist(), "quality").tolist())

    started = CycleRecord(watermark_since=None, watermark_until="2026-01-01T00:00:00+00:00",
                          policy_before="tiny-t5", reward_before="tiny-gpt2")
    reversed_scores = ScorerHealth(0.25, 0.5, [-score for score in health.probe_scores])
    record = with_health(started, health, reversed_scores)
    assert (record.accuracy_before, record.calibration_before) == (health.accuracy, health.calibration_error)
    assert (record.accuracy_after, record.calibration_after, record.probe_drift) == (0.25, 0.5, 2.0)
    assert with_health(started, health, health).probe_drift == 0.0
    assert CycleRecord.from_record(record.to_record()) == record

"""Reward-model health per online cycle: held-out accuracy and calibration, and how far the scores
moved on a fixed probe of (document, summary) pairs, chosen once and saved so that every cycle's
reward model (or DPO implicit reward) scores the same pairs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from rlhf.config.sections import RewardHead
from rlhf.eval.evaluate import PairScorer, evaluate_reward_model
from rlhf.eval.health import score_drift
from rlhf.online.window import FeedbackWindow
from rlhf.store import CycleRecord

PROBE_FILE = "probe.jsonl"
PROBE_SCHEMA = pa.schema([pa.field("original_text", pa.string()), pa.field("summary", pa.string())])


@dataclass(frozen=True)
class ScorerHealth:
    """One reward model (or implicit reward) measured in a cycle."""

    accuracy: float | None  # held-out pairwise accuracy; None without held-out choices
    calibration_error: float | None  # ECE of σ(r_1 − r_0) on the same choices
    probe_scores: list[float]  # the probe pairs' scores, in the probe's order


def choose_probe(window: FeedbackWindow, size: int) -> pa.Table:
    """Up to ``size`` (document, summary) pairs from ``window``: both summaries of each held-out
    comparison (never trained on), then of the new ones."""
    rows = window.holdout.to_pylist() + window.new.to_pylist()
    pairs = [{"original_text": row["original_text"], "summary": row[f"summary_{side}"]}
             for row in rows for side in (0, 1)]
    return pa.Table.from_pylist(pairs[:size], schema=PROBE_SCHEMA)


def load_probe(path: Path, window: FeedbackWindow, size: int) -> pa.Table:
    """The probe saved at ``path``; the first cycle chooses it from its window and saves it (temp
    file + rename, so a killed write leaves no half probe)."""
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        return pa.Table.from_pylist(rows, schema=PROBE_SCHEMA)
    probe = choose_probe(window, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(json.dumps(row) + "\n" for row in probe.to_pylist()))
    staging.replace(path)
    return probe


def score_probe(scorer: PairScorer, probe: pa.Table, head: RewardHead, batch_size: int) -> list[float]:
    """``scorer``'s ``head`` score of every probe pair, in order."""
    scores: list[float] = []
    for offset in range(0, probe.num_rows, batch_size):
        rows = probe.slice(offset, batch_size).to_pydict()
        scores += scorer.score(rows["original_text"], rows["summary"], head).tolist()
    return scores


def measure(
    scorer: PairScorer, holdout: pa.Table, probe: pa.Table, head: RewardHead, bins: int, batch_size: int
) -> ScorerHealth:
    """Held-out accuracy and calibration (one scoring pass) and the probe's scores."""
    report = evaluate_reward_model(scorer, holdout, batch_size, head, bins) if holdout.num_rows else None
    return ScorerHealth(
        accuracy=None if report is None else round(report["accuracy"], 4),
        calibration_error=None if report is None else round(report["calibration_error"], 4),
        probe_scores=score_probe(scorer, probe, head, batch_size),
    )


def with_health(record: CycleRecord, before: ScorerHealth, after: ScorerHealth) -> CycleRecord:
    """``record`` with the accuracy, calibration and probe drift of an update (``after``) against the
    model it continued from (``before``), whether or not the update is kept; drift needs 2 probe pairs."""
    drift = (round(score_drift(before.probe_scores, after.probe_scores), 4)
             if len(before.probe_scores) >= 2 else None)
    return dataclasses.replace(
        record, accuracy_before=before.accuracy, accuracy_after=after.accuracy,
        calibration_before=before.calibration_error, calibration_after=after.calibration_error,
        probe_drift=drift,
    )

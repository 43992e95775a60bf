"""The stored choices one online cycle uses: new rows in its window, a replay sample of older ones,
and the held-out slice that judges the update (reward model or DPO); only preferences on non-gold
pairs, and only from labelers the gold pairs trust (``feedback.min_gold_accuracy``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from rlhf.data.holdout import in_holdout
from rlhf.data.schemas import PREFERENCE_SCHEMA
from rlhf.online.config import FeedbackPolicyConfig, UnscoredLabelers
from rlhf.store import FeedbackStore
from rlhf.store.labelers import Labelers
from rlhf.store.queries import Tally
from rlhf.store.tables import ANONYMOUS, FEEDBACK_SOURCE

# Why a labeler's choices are left out of a cycle (counted per cycle in CycleRecord).
Exclusion = Literal["low_gold_accuracy", "unscored"]


def trainable(export: pa.Table) -> pa.Array:
    """Mask of EXPORT_SCHEMA rows training may read: preferences (not both bad / can't tell, not
    pending) on pairs that are not gold (rlhf.store.queries.TRAINABLE)."""
    return pc.fill_null(pc.and_(pc.equal(export["verdict"], "preference"), pc.is_null(export["gold_id"])),
                        False)


def preference_rows(export: pa.Table) -> pa.Table:
    """EXPORT_SCHEMA rows as canonical PREFERENCE_SCHEMA rows (what reward training reads); rows that
    are not trainable are dropped."""
    rows = export.filter(trainable(export)).select(
        ["original_text", "summary_0", "summary_1", "choice", "policy_0", "policy_1"]
    )
    rows = rows.append_column("source", pa.array([FEEDBACK_SOURCE] * rows.num_rows, pa.string()))
    return rows.select(PREFERENCE_SCHEMA.names).cast(PREFERENCE_SCHEMA)


@dataclass(frozen=True)
class LabelerRule:
    """Whose choices a cycle uses (feedback.min_gold_accuracy and friends); 0 accuracy = everyone."""

    min_gold_accuracy: float = 0.0
    min_gold_answers: int = 5
    unscored: UnscoredLabelers = "keep"

    @classmethod
    def from_config(cls, fb: FeedbackPolicyConfig) -> LabelerRule:
        return cls(fb.min_gold_accuracy, fb.min_gold_answers, fb.unscored_labelers)

    def exclusion(self, labeler: str | None, score: Tally | None) -> Exclusion | None:
        """Why ``labeler``'s choices are left out, or None. Anonymous choices, names typed before
        labeler auth and labelers with fewer than min_gold_answers gold answers are unscored."""
        if self.min_gold_accuracy <= 0:
            return None
        if (labeler in (None, ANONYMOUS) or score is None or score.total < self.min_gold_answers
                or score.rate is None):  # no gold answers at all: only with min_gold_answers 0
            return "unscored" if self.unscored == "hold" else None
        return "low_gold_accuracy" if score.rate < self.min_gold_accuracy else None


@dataclass(frozen=True)
class FeedbackWindow:
    """One cycle's reward data, with the comparison ids behind each part (for the cycle log)."""

    new: pa.Table
    new_ids: list[str]
    replay: pa.Table
    replay_ids: list[str]
    holdout: pa.Table
    holdout_ids: list[str]
    # trainable choices decided in the window that each LabelerRule exclusion left out
    excluded_low_gold_accuracy: int = 0
    excluded_unscored: int = 0

    @property
    def train(self) -> pa.Table:
        return pa.concat_tables([self.new, self.replay])


def _excluded(store: FeedbackStore, decided: pa.Table, until: datetime, rule: LabelerRule
              ) -> list[Exclusion | None]:
    """Each row's exclusion, judging labelers by their gold answers decided up to ``until`` (so a
    resumed cycle leaves out exactly the same rows)."""
    if rule.min_gold_accuracy <= 0:
        return [None] * decided.num_rows
    scores = Labelers(store).gold_scores(until)
    verdicts = {labeler: rule.exclusion(labeler, scores.get(labeler))
                for labeler in set(decided.column("labeler").to_pylist())}
    return [verdicts[labeler] for labeler in decided.column("labeler").to_pylist()]


def read_window(
    store: FeedbackStore, since: datetime | None, until: datetime, holdout_fraction: float,
    replay_ratio: float, seed: int, labelers: LabelerRule = LabelerRule(),
) -> FeedbackWindow:
    """Choices decided in ``(since, until]`` are new; up to ``replay_ratio`` x as many older ones are
    sampled (same seed, same window: same sample on a resumed cycle); held-out rows decided up to
    ``until`` form the judging set. Only trainable rows of labelers ``labelers`` keeps are used; the
    window's rows it left out are counted per reason."""
    decided = store.export_table(include_pending=False, until=until)
    decided = decided.filter(trainable(decided))
    excluded = _excluded(store, decided, until, labelers)
    in_window = [since is None or t > since for t in decided.column("decided_at").to_pylist()]
    counts = Counter(reason for reason, new in zip(excluded, in_window) if reason is not None and new)
    decided = decided.filter(pa.array([reason is None for reason in excluded], pa.bool_()))
    ids = decided.column("comparison_id").to_pylist()
    times = decided.column("decided_at").to_pylist()
    held = [in_holdout(i, holdout_fraction) for i in ids]  # held-out rows stay held out every cycle
    new = [k for k, t in enumerate(times) if not held[k] and (since is None or t > since)]
    older = [k for k, t in enumerate(times) if not held[k] and since is not None and t <= since]
    replay = sorted(random.Random(seed).sample(older, min(len(older), round(replay_ratio * len(new)))))
    holdout = [k for k in range(len(ids)) if held[k]]

    def part(indices: list[int]) -> tuple[pa.Table, list[str]]:
        return preference_rows(decided.take(pa.array(indices, pa.int64()))), [ids[k] for k in indices]

    return FeedbackWindow(*part(new), *part(replay), *part(holdout), counts["low_gold_accuracy"],
                          counts["unscored"])

"""The stored choices one online cycle uses: new rows in its window, a replay sample of older ones,
and the held-out slice that judges the reward model.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa

from rlhf.data.schemas import PREFERENCE_SCHEMA
from rlhf.store import FeedbackStore
from rlhf.store.tables import FEEDBACK_SOURCE


def is_holdout(comparison_id: str, fraction: float) -> bool:
    """A stable coin per comparison: held-out rows stay held out in every cycle, so the reward
    model is never judged on a row it was trained on."""
    bucket = int(hashlib.sha256(comparison_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def preference_rows(export: pa.Table) -> pa.Table:
    """EXPORT_SCHEMA rows as canonical PREFERENCE_SCHEMA rows (what reward training reads)."""
    rows = export.select(["original_text", "summary_0", "summary_1", "choice", "policy_0", "policy_1"])
    rows = rows.append_column("source", pa.array([FEEDBACK_SOURCE] * rows.num_rows, pa.string()))
    return rows.select(PREFERENCE_SCHEMA.names).cast(PREFERENCE_SCHEMA)


@dataclass(frozen=True)
class FeedbackWindow:
    """One cycle's reward data, with the comparison ids behind each part (for the cycle log)."""

    new: pa.Table
    new_ids: list[str]
    replay: pa.Table
    replay_ids: list[str]
    holdout: pa.Table
    holdout_ids: list[str]

    @property
    def train(self) -> pa.Table:
        return pa.concat_tables([self.new, self.replay])


def read_window(
    store: FeedbackStore, since: datetime | None, until: datetime, holdout_fraction: float,
    replay_ratio: float, seed: int,
) -> FeedbackWindow:
    """Choices decided in ``(since, until]`` are new; up to ``replay_ratio`` x as many older ones are
    sampled (same seed, same window: same sample on a resumed cycle); held-out rows decided up to
    ``until`` form the judging set."""
    decided = store.export_table(include_pending=False, until=until)
    ids = decided.column("comparison_id").to_pylist()
    times = decided.column("decided_at").to_pylist()
    held = [is_holdout(i, holdout_fraction) for i in ids]
    new = [k for k, t in enumerate(times) if not held[k] and (since is None or t > since)]
    older = [k for k, t in enumerate(times) if not held[k] and since is not None and t <= since]
    replay = sorted(random.Random(seed).sample(older, min(len(older), round(replay_ratio * len(new)))))
    holdout = [k for k in range(len(ids)) if held[k]]

    def part(indices: list[int]) -> tuple[pa.Table, list[str]]:
        return preference_rows(decided.take(pa.array(indices, pa.int64()))), [ids[k] for k in indices]

    return FeedbackWindow(*part(new), *part(replay), *part(holdout))

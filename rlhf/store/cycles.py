"""The online loop's ledger: which feedback window each cycle trains on and how far it got.

Stages: ``started`` (window fixed), ``reward_done`` (reward model decided: kept or rejected), ``done``
(policy published). A restarted loop finishes the last unfinished cycle on the same window, so no
choice is trained on twice by the reward update or skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from rlhf.store.feedback import FeedbackStore
from rlhf.store.tables import online_cycles, utcnow

STAGES = ("started", "reward_done", "done")


@dataclass(frozen=True)
class Cycle:
    cycle: int
    since: datetime | None  # choices decided in (since, until] are this cycle's new rows
    until: datetime
    stage: str
    record: dict  # what the cycle used and measured, logged as it goes
    started_at: datetime
    finished_at: datetime | None

    @property
    def done(self) -> bool:
        return self.stage == "done"


class CycleLog:
    """Rows of ``online_cycles`` in the feedback database; each write is its own transaction."""

    def __init__(self, store: FeedbackStore):
        self._store = store

    def all(self) -> list[Cycle]:
        """Every cycle, oldest first."""
        return self._select(sa.select(online_cycles).order_by(online_cycles.c.cycle))

    def _select(self, query: sa.Select) -> list[Cycle]:
        with self._store.engine.connect() as conn:
            rows = conn.execute(query).mappings()
            return [Cycle(**{**row, "record": json.loads(row["record"])}) for row in rows]

    def start(self, cycle: int, since: datetime | None, until: datetime, record: dict) -> Cycle:
        """Fix a new cycle's window; a second start of the same number fails on the primary key."""
        with self._store.write() as conn:
            conn.execute(online_cycles.insert().values(
                cycle=cycle, since=since, until=until, stage="started", record=json.dumps(record),
                started_at=utcnow(),
            ))
        return self._get(cycle)

    def advance(self, cycle: int, stage: str, record: dict) -> Cycle:
        """Move ``cycle`` to ``stage`` with its updated record (``done`` also sets finished_at)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        values = {"stage": stage, "record": json.dumps(record)}
        if stage == "done":
            values["finished_at"] = utcnow()
        with self._store.write() as conn:
            conn.execute(online_cycles.update().where(online_cycles.c.cycle == cycle).values(**values))
        return self._get(cycle)

    def _get(self, cycle: int) -> Cycle:
        return self._select(sa.select(online_cycles).where(online_cycles.c.cycle == cycle))[0]

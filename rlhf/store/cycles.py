"""The online loop's ledger: which feedback window each cycle trains on and how far it got.

Stages: ``started`` (window fixed), ``reward_done`` (the cycle's update decided, kept or rejected: the
reward model's, or with method=dpo the policy's; the name predates DPO and is kept because ledgers
store it), ``done`` (policy published or refused). A restarted loop finishes the last unfinished cycle
on the same window, so no choice is trained on twice by the update or skipped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import sqlalchemy as sa

from rlhf.store.feedback import FeedbackStore
from rlhf.store.tables import online_cycles, utcnow

CycleStage = Literal["started", "reward_done", "done"]
STAGES: tuple[CycleStage, ...] = get_args(CycleStage)
RENAMED = {"ppo": "publish_skipped"}  # CycleRecord keys older code wrote under another name


@dataclass(frozen=True)
class PPOSummary:
    """The headline numbers of one PPO iteration a cycle ran (IterationMetrics' names and units)."""

    reward_mean: float  # raw score
    kl_mean: float  # KL to the reference per summary
    response_length_mean: float  # tokens


@dataclass(frozen=True)
class SummaryStats:
    """How one policy writes on the publish guard's documents (greedy): what reward hacking inflates."""

    length_mean: float  # tokens before eos (or max_new_tokens)
    repetition: float  # mean share of repeated word n-grams per summary (rlhf.eval.health.repetition)
    unfinished: float  # share of summaries that hit max_new_tokens without eos


@dataclass(frozen=True)
class GuardReport:
    """The publish guard's measurements and verdict (rlhf.online.guard)."""

    documents: int  # stored documents both policies summarised
    before: SummaryStats  # the served policy the cycle started from
    after: SummaryStats  # the cycle's new policy
    win_rate: float | None  # people's choice of the served version against other versions; None: none decided
    win_comparisons: int  # decided comparisons behind win_rate
    refused: list[str]  # the failed checks, each naming its guard.* key; empty = published

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> GuardReport:
        stats = {key: SummaryStats(**record[key]) for key in ("before", "after")}
        return cls(**{**record, **stats})


@dataclass(frozen=True)
class CycleRecord:
    """What a cycle used and measured, filled in stage by stage (None = not reached yet, or not this
    cycle's method); stored as JSON with the field names as keys, in ``online_cycles.record`` and the
    loop's cycles.jsonl. Shared fields describe every cycle; ``reward_*`` only method=reward_model's,
    ``dpo_*`` only method=dpo's."""

    # started: the feedback window and what the cycle starts from
    watermark_since: str | None  # ISO time, exclusive; None = from the first choice
    watermark_until: str  # ISO time, inclusive
    policy_before: str  # the served policy RL or DPO continues from (registry version folder or model name)
    reward_before: str | None = None  # reward_model: the reward model the update continues from
    # reward_done: the update on the window and whether it was kept
    new_ids: list[str] | None = None  # comparison ids of the window trained on
    replay_ids: list[str] | None = None  # older comparison ids trained on again
    holdout_ids: list[str] | None = None  # comparison ids the update is judged on
    # choices decided in the window left out by feedback.min_gold_accuracy, and as unscored (hold)
    excluded_low_gold_accuracy: int | None = None
    excluded_unscored: int | None = None
    # The held-out gate's and health numbers of the scorer the cycle updated, before (what it
    # continued from) and after the update: the reward model (reward_model), or the policy's implicit
    # reward against rl.policy (dpo). One set of fields: both are pairwise scorers judged alike.
    accuracy_before: float | None = None  # held-out pairwise accuracy; also None with no held-out rows
    accuracy_after: float | None = None
    calibration_before: float | None = None  # ECE of σ(r_1 − r_0) on the held-out choices (None: none)
    calibration_after: float | None = None
    probe_drift: float | None = None  # 1 − Spearman of the update's probe scores vs those before it
    # reward_model: the reward update
    reward_judged: bool | None = None  # enough held-out rows to judge the update
    reward_kept: bool | None = None
    reward_used: str | None = None  # the reward model RL scores with: the update or reward_before
    # dpo: the DPO update of policy_before
    dpo_judged: bool | None = None  # enough held-out rows to judge the update
    dpo_kept: bool | None = None  # passed the gate: the candidate the cycle publishes
    dpo_policy: str | None = None  # the trained policy's folder (cycles/cNNNN/dpo/model), kept or not
    # done: the RL run (reward_model) and the version the cycle published
    documents: int | None = None  # stored documents RL sampled from
    policy_version: str | None = None  # e.g. "v0003"
    ppo_first: PPOSummary | None = None  # the first and last RL iteration
    ppo_last: PPOSummary | None = None
    # why the publish step (RL, guard, publish) did not run: its version was published before a
    # restart, or (dpo) the update was rejected by the held-out gate
    publish_skipped: str | None = None
    candidate: str | None = None  # the new policy's folder; outside the registry when the guard refused it
    guard: GuardReport | None = None  # the publish guard's checks; None when guard.enabled is false

    def to_record(self) -> dict[str, Any]:
        """The JSON form: every key, null where a stage has not set it."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CycleRecord:
        """Read a record back; one written at an earlier stage, or by older code, lacks later keys
        (and may name some by their ``RENAMED`` keys)."""
        record = {RENAMED.get(key, key): value for key, value in record.items()}
        nested: dict[str, PPOSummary | GuardReport] = {
            key: PPOSummary(**record[key]) for key in ("ppo_first", "ppo_last") if record.get(key) is not None
        }
        if record.get("guard") is not None:
            nested["guard"] = GuardReport.from_record(record["guard"])
        return cls(**{**record, **nested})


@dataclass(frozen=True)
class Cycle:
    cycle: int
    since: datetime | None  # choices decided in (since, until] are this cycle's new rows
    until: datetime
    stage: CycleStage
    record: CycleRecord  # what the cycle used and measured, logged as it goes
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
            return [Cycle(**{**row, "record": CycleRecord.from_record(json.loads(row["record"]))})
                    for row in rows]

    def start(self, cycle: int, since: datetime | None, until: datetime, record: CycleRecord) -> Cycle:
        """Fix a new cycle's window; a second start of the same number fails on the primary key."""
        with self._store.write() as conn:
            conn.execute(online_cycles.insert().values(
                cycle=cycle, since=since, until=until, stage="started", record=json.dumps(record.to_record()),
                started_at=utcnow(),
            ))
        return self._get(cycle)

    def advance(self, cycle: int, stage: CycleStage, record: CycleRecord) -> Cycle:
        """Move ``cycle`` to ``stage`` with its updated record (``done`` also sets finished_at)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        values: dict[str, str | datetime] = {"stage": stage, "record": json.dumps(record.to_record())}
        if stage == "done":
            values["finished_at"] = utcnow()
        with self._store.write() as conn:
            conn.execute(online_cycles.update().where(online_cycles.c.cycle == cycle).values(**values))
        return self._get(cycle)

    def _get(self, cycle: int) -> Cycle:
        return self._select(sa.select(online_cycles).where(online_cycles.c.cycle == cycle))[0]

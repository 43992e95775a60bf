"""What every online method's cycle shares, and the interface the loop (rlhf.online.loop) drives.

A method (``OnlineCycle``: rlhf.online.reward_cycle for method=reward_model, rlhf.online.dpo_cycle
for method=dpo) learns from the cycle's feedback window (update, held-out gate, health) and then
publishes. ``CycleContext`` holds what both need once: the window, the probe, the held-out
judgement, the current policy, and the publish guard + publish to the registry Serve watches.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import pyarrow as pa

from rlhf.config.sections import ModelConfig
from rlhf.eval.evaluate import PairScorer
from rlhf.metrics import emit
from rlhf.online.config import FeedbackPolicyConfig, OnlineConfig
from rlhf.online.guard import check_policy
from rlhf.online.scorer_health import PROBE_FILE, ScorerHealth, load_probe, measure, with_health
from rlhf.online.window import FeedbackWindow, LabelerRule, read_window
from rlhf.registry import PolicyRegistry
from rlhf.runtime import derive_seed
from rlhf.store import Cycle, CycleRecord, FeedbackStore, GuardReport

EVAL_BATCH = 16
T = TypeVar("T")


class OnlineCycle(Protocol):
    """One online method's half of a cycle; the loop records each call's result before the next."""

    def begin(self, record: CycleRecord) -> CycleRecord:
        """``record`` (the window and the served policy) with what else this method starts from."""

    def learn(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """Update on the window, judged on its held-out choices: the ``reward_done`` record."""

    def publish(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """Turn the decided update into a guarded policy version: the ``done`` record."""

    def verdict(self, record: CycleRecord) -> str:
        """The held-out gate's numbers and decision, for the loop's progress line."""


def keep_update(
    before: float | None, after: float | None, holdout_rows: int, fb: FeedbackPolicyConfig
) -> tuple[bool, bool]:
    """(judged, kept): with at least ``fb.min_holdout`` held-out choices the update is kept only if
    accuracy fell by at most ``fb.max_accuracy_drop``; with fewer it is kept unjudged."""
    if holdout_rows < max(fb.min_holdout, 1) or before is None or after is None:
        return False, True
    return True, after >= before - fb.max_accuracy_drop


@dataclass(frozen=True)
class JudgedUpdate:
    """A trained update and the held-out gate's decision on it."""

    trained: Path  # the updated model's folder (the cycle's own, not yet published anywhere)
    judged: bool  # enough held-out choices to judge it
    kept: bool
    record: CycleRecord  # the cycle's record with the window's ids and both scorers' health


# A method's update: (training choices, validation choices) -> the trained model's folder.
Trainer = Callable[[pa.Table, pa.Table], Path]
# The scorer a method judges, measured on the window's held-out choices and the probe:
# (model folder or name, window, probe) -> health.
HealthOf = Callable[[str, FeedbackWindow, pa.Table], ScorerHealth]


def verdict_line(scorer: str, record: CycleRecord, kept: bool | None) -> str:
    """The gate's line for a method whose ``scorer`` is judged and whose verdict field is ``kept``."""
    return (f"{scorer} accuracy {record.accuracy_before} -> {record.accuracy_after} "
            f"({'kept' if kept else 'rejected'})")


class CycleContext:
    """The loop's store, registry and config as every method's cycle uses them."""

    def __init__(self, cfg: OnlineConfig, store: FeedbackStore, policies: PolicyRegistry):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.store = store
        self.policies = policies

    def window(self, cycle: Cycle) -> FeedbackWindow:
        """The cycle's new, replayed and held-out choices, the same on every read of the cycle."""
        fb = self.cfg.feedback
        window = read_window(self.store, cycle.since, cycle.until, fb.holdout_fraction, fb.replay_ratio,
                             derive_seed(self.cfg.seed, cycle.cycle), LabelerRule.from_config(fb))
        if window.excluded_low_gold_accuracy or window.excluded_unscored:
            emit(f"online: cycle {cycle.cycle} leaves out {window.excluded_low_gold_accuracy} choices of "
                 f"labelers below feedback.min_gold_accuracy and {window.excluded_unscored} of unscored "
                 "labelers (feedback.unscored_labelers=hold)")
        return window

    def seed(self, cycle: Cycle) -> int:
        return derive_seed(self.cfg.seed, cycle.cycle)

    def judge_update(
        self, cycle: Cycle, update: str, start: str, train: Trainer, health: HealthOf
    ) -> JudgedUpdate:
        """Train on the window (new + replayed choices), then measure the scorer before (``start``) and
        after the update on the held-out choices and the probe; kept unless accuracy fell by more than
        ``feedback.max_accuracy_drop`` (judged once ``feedback.min_holdout`` held-out choices exist)."""
        window = self.window(cycle)
        emit(f"online: cycle {cycle.cycle} {update} {start}: {window.new.num_rows} new + "
             f"{window.replay.num_rows} replayed choices, {window.holdout.num_rows} held out")
        trained = train(window.train, window.holdout if window.holdout.num_rows else window.new)
        probe = load_probe(self.output_dir / PROBE_FILE, window, self.cfg.health.probe_size)
        before, after = health(start, window, probe), health(str(trained), window, probe)
        fb = self.cfg.feedback
        judged, kept = keep_update(before.accuracy, after.accuracy, window.holdout.num_rows, fb)
        record = dataclasses.replace(
            cycle.record, new_ids=window.new_ids, replay_ids=window.replay_ids,
            holdout_ids=window.holdout_ids, excluded_low_gold_accuracy=window.excluded_low_gold_accuracy,
            excluded_unscored=window.excluded_unscored,
        )
        return JudgedUpdate(trained, judged, kept, with_health(record, before, after))

    def measure(self, scorer: PairScorer, window: FeedbackWindow, probe: pa.Table) -> ScorerHealth:
        """Held-out accuracy and calibration (None without held-out choices) and the probe's scores."""
        return measure(scorer, window.holdout, probe, self.cfg.reward_head, self.cfg.health.calibration_bins,
                       EVAL_BATCH)

    def publish(self, cycle: Cycle, record: CycleRecord) -> CycleRecord:
        """Publish ``record.candidate`` as the next (and current) version unless the guard refuses it;
        its metrics keep the candidate's and name the cycle (how the loop recognises, after a restart,
        a version it published)."""
        guard = self._guard(record) if self.cfg.guard.enabled else None
        if guard is not None and guard.refused:
            return dataclasses.replace(record, guard=guard)
        candidate = Path(recorded(record.candidate, "candidate"))
        metrics = {**PolicyRegistry(candidate.parent).metrics(candidate.name), "cycle": cycle.cycle,
                   "watermark_until": record.watermark_until, "accuracy_before": record.accuracy_before,
                   "accuracy_after": record.accuracy_after}
        version = self.policies.publish(copy_of(candidate), metrics)
        return dataclasses.replace(record, guard=guard, policy_version=version.name)

    def _guard(self, record: CycleRecord) -> GuardReport:
        """The candidate against the policy the cycle started from (named in /v1/compare by its
        version when it came from the registry)."""
        before = Path(record.policy_before)
        served = before.name if before.parent == self.policies.root else None
        candidate = self.policy_config(recorded(record.candidate, "candidate"))
        return check_policy(self.store, self.policy_config(record.policy_before), candidate, served,
                            self.cfg.guard, self.cfg.rl.ppo.max_new_tokens)

    def policy_config(self, name_or_path: str) -> ModelConfig:
        """rl.policy (its lengths apply to every version) loading ``name_or_path``."""
        return dataclasses.replace(self.cfg.rl.policy, name_or_path=name_or_path)

    def current_policy(self) -> str:
        """The version Serve answers with (the registry's current, e.g. after a rollback)."""
        current = self.policies.current()
        return str(current) if current is not None else self.cfg.rl.policy.name_or_path


def recorded(value: T | None, name: str) -> T:
    """A record field an earlier stage of the cycle set (None until that stage has run)."""
    if value is None:
        raise RuntimeError(f"the cycle record has no {name}: the stage that sets it has not run")
    return value


def copy_of(folder: Path) -> Callable[[Path], None]:
    """A registry ``publish`` writer that copies ``folder`` into the new version's folder."""

    def copy(target: Path) -> None:
        shutil.copytree(folder, target, dirs_exist_ok=True)

    return copy

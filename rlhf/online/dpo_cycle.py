"""method=dpo: no reward model. DPO of the served policy on the window (+ replay), with the cycle's
starting policy as its reference; kept only if held-out implicit-reward accuracy did not drop, then
published as the next version behind the same guard."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa

from rlhf.dpo.task import train_dpo_policy
from rlhf.models.scoring import load_implicit_reward
from rlhf.online.cycle import CycleContext, verdict_line
from rlhf.online.scorer_health import ScorerHealth
from rlhf.online.window import FeedbackWindow
from rlhf.store import Cycle, CycleRecord


class DPOCycle:
    """A DPO update of the served policy behind the held-out gate; the kept policy is the candidate."""

    def __init__(self, context: CycleContext):
        self.context = context
        self.cfg = context.cfg

    def begin(self, record: CycleRecord) -> CycleRecord:
        """Nothing beside the served policy: it is both DPO's start and its reference."""
        return record

    def learn(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """DPO of ``policy_before`` (also its reference) on the new and replayed choices, judged on
        implicit-reward accuracy with both policies measured against rl.policy, the loop's first."""
        start = cycle.record.policy_before

        def train(training: pa.Table, validation: pa.Table) -> Path:
            return train_dpo_policy(
                self.context.policy_config(start), self.cfg.dpo_train, self.cfg.dpo, training, validation,
                str(cycle_dir / "dpo"), self.context.seed(cycle),
            ).model_dir

        update = self.context.judge_update(cycle, "DPO update of", start, train, self.health)
        return dataclasses.replace(update.record, dpo_judged=update.judged, dpo_kept=update.kept,
                                   dpo_policy=str(update.trained))

    def health(self, policy: str, window: FeedbackWindow, probe: pa.Table) -> ScorerHealth:
        """``policy``'s implicit reward against rl.policy, measured as a reward model is: one fixed
        reference, so the policies before and after an update are comparable."""
        scorer = load_implicit_reward(self.context.policy_config(policy), self.cfg.rl.policy,
                                      self.cfg.dpo.beta)
        return self.context.measure(scorer, window, probe)

    def publish(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """Publish the kept DPO policy as the next version Serve loads if the guard passes it; a
        rejected one is not."""
        record = cycle.record
        if not record.dpo_kept:
            return dataclasses.replace(
                record, publish_skipped="the DPO update was rejected by the held-out gate"
            )
        return self.context.publish(cycle, dataclasses.replace(record, candidate=record.dpo_policy))

    def verdict(self, record: CycleRecord) -> str:
        return verdict_line("implicit-reward", record, record.dpo_kept)

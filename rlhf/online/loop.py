"""jobs/online.py: each cycle turns new human choices into a new served policy version.

wait for K new choices -> continue-train the reward model on them (+ replay) -> keep it only if
held-out accuracy did not drop -> M PPO iterations on the stored documents -> publish to the
registry Serve watches. The ledger in the feedback database (rlhf.store.cycles) makes it resumable.

``method=rm_grpo`` runs the same cycle with the GRPO estimator. ``method=dpo`` has no reward model:
DPO of the served policy on the same window (reference: the cycle's starting policy) -> keep it
only if held-out implicit-reward accuracy did not drop -> publish. Its ledger uses the same
stages and fields: the reward_* fields then describe the DPO update (whose implicit reward is
what the gate judges) and ``reward_used`` is the trained policy folder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa

from rlhf.config.core import validate
from rlhf.config.sections import DataSourceConfig, ModelConfig
from rlhf.dpo.implicit import load_implicit_reward
from rlhf.dpo.task import train_dpo_policy
from rlhf.errors import InputError
from rlhf.metrics import IterationMetrics, emit
from rlhf.models.heads import load_reward_model
from rlhf.online.config import FeedbackPolicyConfig, OnlineConfig
from rlhf.online.feedback import FeedbackWindow, LabelerRule, read_window
from rlhf.online.guard import check_policy
from rlhf.online.health import PROBE_FILE, ScorerHealth, load_probe, measure, with_health
from rlhf.ppo.config import PPOConfig, PPORewardConfig
from rlhf.registry import PolicyRegistry
from rlhf.runtime import derive_seed, init_ray
from rlhf.store import Cycle, CycleLog, CycleRecord, FeedbackStore, GuardReport, PPOSummary, check_url
from rlhf.store.tables import utcnow
from rlhf.train.reward import train_reward_model

EVAL_BATCH = 16


class FeedbackTimeout(InputError):
    """Not enough new feedback arrived within ``feedback.max_wait_s``."""


def keep_reward_update(
    before: float | None, after: float | None, holdout_rows: int, fb: FeedbackPolicyConfig
) -> tuple[bool, bool]:
    """(judged, kept): with at least ``fb.min_holdout`` held-out choices the update is kept only if
    accuracy fell by at most ``fb.max_accuracy_drop``; with fewer it is kept unjudged."""
    judged = holdout_rows >= max(fb.min_holdout, 1) and before is not None and after is not None
    return judged, not judged or after >= before - fb.max_accuracy_drop


class OnlineLoop:
    """Runs cycles until ``cfg.cycles`` have finished; every step is recorded before the next."""

    def __init__(self, cfg: OnlineConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.store = FeedbackStore.from_config(cfg.store)
        self.ledger = CycleLog(self.store)
        self.policies = PolicyRegistry(cfg.registry)
        self.rewards = PolicyRegistry(cfg.reward_registry or self.output_dir / "reward_registry")

    def run(self) -> list[Cycle]:
        """Finish an interrupted cycle first, then start new ones; returns the cycles this call ran."""
        ran = []
        while True:
            cycles = self.ledger.all()
            last = cycles[-1] if cycles else None
            finished = sum(c.done for c in cycles)
            if last is not None and not last.done:
                emit(f"online: resuming cycle {last.cycle} at stage {last.stage}")
                cycle = last
            elif self.cfg.cycles and finished >= self.cfg.cycles:
                return ran
            else:
                cycle = self._start(last)
            ran.append(self._finish(cycle))

    def _start(self, last: Cycle | None) -> Cycle:
        """Wait for K new choices after the watermark, then fix the new cycle's window."""
        since = last.until if last is not None else None
        number = last.cycle + 1 if last is not None else 1
        fb = self.cfg.feedback
        started = time.monotonic()
        while True:
            until = utcnow() - timedelta(seconds=fb.settle_s)
            new = self.store.count_decided(since, until)
            if new >= fb.min_new:
                break
            waited = time.monotonic() - started
            if fb.max_wait_s is not None and waited > fb.max_wait_s:
                raise FeedbackTimeout(f"feedback.max_wait_s: only {new} of {fb.min_new} new choices after "
                                      f"{waited:.0f} s; lower feedback.min_new or wait longer")
            emit(f"online: cycle {number} waiting for feedback: {new}/{fb.min_new} new choices")
            time.sleep(fb.poll_interval_s)
        record = CycleRecord(watermark_since=_iso(since), watermark_until=until.isoformat(),
                             policy_before=self._current_policy(), reward_before=self._current_reward())
        emit(f"online: cycle {number} starts on {new} new choices in ({record.watermark_since}, "
             f"{record.watermark_until}]")
        return self.ledger.start(number, since, until, record)

    def _finish(self, cycle: Cycle) -> Cycle:
        cycle_dir = self.output_dir / "cycles" / f"c{cycle.cycle:04d}"
        learn, publish = self._update_reward, self._update_policy
        if self.cfg.method == "dpo":
            learn, publish = self._update_dpo, self._publish_dpo
        if cycle.stage == "started":
            cycle = self.ledger.advance(cycle.cycle, "reward_done", learn(cycle, cycle_dir))
        published = self._published_by(cycle)
        if published is not None:  # killed between publishing and recording it
            record = dataclasses.replace(cycle.record, policy_version=published,
                                         ppo="published before a restart")
        else:
            record = publish(cycle, cycle_dir)
        cycle = self.ledger.advance(cycle.cycle, "done", record)
        with (self.output_dir / "cycles.jsonl").open("a") as log:
            log.write(json.dumps({"cycle": cycle.cycle, **record.to_record()}) + "\n")
        emit(f"online: cycle {cycle.cycle} done: reward accuracy {record.accuracy_before} -> "
             f"{record.accuracy_after} ({'kept' if record.reward_kept else 'rejected'}), {_outcome(record)}")
        return cycle

    def _published_by(self, cycle: Cycle) -> str | None:
        """The version ``cycle`` published, if any: its metrics name the cycle and its window."""
        mark = {"cycle": cycle.cycle, "watermark_until": cycle.record.watermark_until}
        return next((version for version in reversed(self.policies.versions())
                     if mark.items() <= self.policies.metrics(version).items()), None)

    def _window(self, cycle: Cycle) -> FeedbackWindow:
        fb = self.cfg.feedback
        window = read_window(self.store, cycle.since, cycle.until, fb.holdout_fraction, fb.replay_ratio,
                             derive_seed(self.cfg.seed, cycle.cycle), LabelerRule.from_config(fb))
        if window.excluded_low_gold_accuracy or window.excluded_unscored:
            emit(f"online: cycle {cycle.cycle} leaves out {window.excluded_low_gold_accuracy} choices of "
                 f"labelers below feedback.min_gold_accuracy and {window.excluded_unscored} of unscored "
                 "labelers (feedback.unscored_labelers=hold)")
        return window

    def _update_reward(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """Continue-train from the last kept reward model; keep the result only if held-out accuracy
        did not fall by more than ``feedback.max_accuracy_drop`` (judged once ``feedback.min_holdout``
        held-out choices exist)."""
        fb = self.cfg.feedback
        window = self._window(cycle)
        base = cycle.record.reward_before
        emit(f"online: cycle {cycle.cycle} reward update from {base}: {window.new.num_rows} new + "
             f"{window.replay.num_rows} replayed choices, {window.holdout.num_rows} held out")
        validation = window.holdout if window.holdout.num_rows else window.new
        training = dataclasses.replace(self.cfg.reward, model=self._reward_config(base))
        trained = train_reward_model(training, window.train, validation, str(cycle_dir / "reward"),
                                     derive_seed(self.cfg.seed, cycle.cycle)).model_dir
        probe = self._probe(window)
        before = self._reward_health(base, window, probe)
        after = self._reward_health(str(trained), window, probe)
        judged, kept = keep_reward_update(before.accuracy, after.accuracy, window.holdout.num_rows, fb)
        used = base
        if kept:
            metrics = {"cycle": cycle.cycle, "accuracy_before": before.accuracy,
                       "accuracy_after": after.accuracy}
            def copy(folder: Path) -> None:
                shutil.copytree(trained, folder, dirs_exist_ok=True)

            used = str(self.rewards.publish(copy, metrics))
        return with_health(dataclasses.replace(
            cycle.record, new_ids=window.new_ids, replay_ids=window.replay_ids,
            holdout_ids=window.holdout_ids, excluded_low_gold_accuracy=window.excluded_low_gold_accuracy,
            excluded_unscored=window.excluded_unscored, reward_judged=judged, reward_kept=kept,
            reward_used=used,
        ), before, after)

    def _probe(self, window: FeedbackWindow) -> pa.Table:
        return load_probe(self.output_dir / PROBE_FILE, window, self.cfg.health.probe_size)

    def _reward_health(self, reward: str, window: FeedbackWindow, probe: pa.Table) -> ScorerHealth:
        """Held-out accuracy and calibration (None without held-out choices) and the probe's scores."""
        model = load_reward_model(self._reward_config(reward)).eval()
        return measure(model, window.holdout, probe, self.cfg.reward_head, self.cfg.health.calibration_bins,
                       EVAL_BATCH)

    def _update_policy(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """M PPO iterations from the current policy on the stored documents with the reward model the
        update chose; the result (in the cycle's own candidates registry) is published if the guard
        passes it."""
        from rlhf.ppo.job import run_ppo  # Ray roles: imported only when a cycle gets this far

        documents = cycle_dir / "documents.jsonl"
        n_documents = _write_documents(self.store.documents_table(), documents)
        rl = self.cfg.rl_training()
        training = dataclasses.replace(
            rl, policy=dataclasses.replace(rl.policy, name_or_path=cycle.record.policy_before),
            ppo=dataclasses.replace(rl.ppo, publish_every=rl.ppo.iterations),
        )
        cfg = PPOConfig.for_run(
            training, output_dir=str(cycle_dir / "ppo"), seed=derive_seed(self.cfg.seed, cycle.cycle),
            reward=PPORewardConfig(model=self._reward_config(cycle.record.reward_used), fn="",
                                   head=self.cfg.reward_head),
            prompts=DataSourceConfig(path=str(documents)), registry=str(cycle_dir / "candidates"),
        )
        validate(cfg)
        emit(f"online: cycle {cycle.cycle} PPO from {cfg.policy.name_or_path}: {cfg.ppo.iterations} "
             f"iterations on {n_documents} stored documents")
        history = run_ppo(cfg)
        record = dataclasses.replace(cycle.record, documents=n_documents,
                                     candidate=str(PolicyRegistry(cfg.registry).latest()),
                                     ppo_first=_summary(history[0]), ppo_last=_summary(history[-1]))
        return self._publish(cycle, record)

    def _update_dpo(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """DPO of the cycle's starting policy (also its reference) on the new and replayed choices;
        kept only if held-out implicit-reward accuracy did not fall by more than
        ``feedback.max_accuracy_drop``, both policies judged against rl.policy, the loop's first."""
        window, start = self._window(cycle), cycle.record.policy_before
        emit(f"online: cycle {cycle.cycle} DPO update of {start}: {window.new.num_rows} new + "
             f"{window.replay.num_rows} replayed choices, {window.holdout.num_rows} held out")
        validation = window.holdout if window.holdout.num_rows else window.new
        trained = train_dpo_policy(
            self._policy_config(start), self.cfg.dpo_train, self.cfg.dpo, window.train, validation,
            str(cycle_dir / "dpo"), derive_seed(self.cfg.seed, cycle.cycle),
        ).model_dir
        probe = self._probe(window)
        before = self._implicit_health(start, window, probe)
        after = self._implicit_health(str(trained), window, probe)
        judged, kept = keep_reward_update(before.accuracy, after.accuracy, window.holdout.num_rows,
                                          self.cfg.feedback)
        return with_health(dataclasses.replace(
            cycle.record, new_ids=window.new_ids, replay_ids=window.replay_ids,
            holdout_ids=window.holdout_ids, excluded_low_gold_accuracy=window.excluded_low_gold_accuracy,
            excluded_unscored=window.excluded_unscored, reward_judged=judged, reward_kept=kept,
            reward_used=str(trained),
        ), before, after)

    def _implicit_health(self, policy: str, window: FeedbackWindow, probe: pa.Table) -> ScorerHealth:
        """``policy``'s implicit reward against rl.policy measured as ``_reward_health`` measures a
        reward model: one fixed reference, so the policies before and after an update are comparable."""
        scorer = load_implicit_reward(self._policy_config(policy), self.cfg.rl.policy, self.cfg.dpo.beta)
        return measure(scorer, window.holdout, probe, self.cfg.reward_head, self.cfg.health.calibration_bins,
                       EVAL_BATCH)

    def _publish_dpo(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """Publish the kept DPO policy as the next version Serve loads if the guard passes it; a
        rejected one is not."""
        record = cycle.record
        if not record.reward_kept:
            return dataclasses.replace(record, ppo="the DPO update was rejected by the held-out gate")
        return self._publish(cycle, dataclasses.replace(record, candidate=record.reward_used))

    def _publish(self, cycle: Cycle, record: CycleRecord) -> CycleRecord:
        """Publish ``record.candidate`` as the next (and current) version unless the guard refuses it;
        its metrics keep the candidate's and name the cycle (``_published_by``)."""
        guard = self._guard(record) if self.cfg.guard.enabled else None
        if guard is not None and guard.refused:
            return dataclasses.replace(record, guard=guard)
        candidate = Path(record.candidate)
        metrics = {**PolicyRegistry(candidate.parent).metrics(candidate.name), "cycle": cycle.cycle,
                   "watermark_until": record.watermark_until, "accuracy_before": record.accuracy_before,
                   "accuracy_after": record.accuracy_after}

        def copy(folder: Path) -> None:
            shutil.copytree(candidate, folder, dirs_exist_ok=True)

        version = self.policies.publish(copy, metrics)
        return dataclasses.replace(record, guard=guard, policy_version=version.name)

    def _guard(self, record: CycleRecord) -> GuardReport:
        """The candidate against the policy the cycle started from (named in /v1/compare by its
        version when it came from the registry)."""
        before = Path(record.policy_before)
        served = before.name if before.parent == self.policies.root else None
        return check_policy(self.store, self._policy_config(record.policy_before),
                            self._policy_config(record.candidate), served, self.cfg.guard,
                            self.cfg.rl.ppo.max_new_tokens)

    def _policy_config(self, name_or_path: str) -> ModelConfig:
        return dataclasses.replace(self.cfg.rl.policy, name_or_path=name_or_path)

    def _reward_config(self, name_or_path: str) -> ModelConfig:
        return dataclasses.replace(self.cfg.reward.model, name_or_path=name_or_path)

    def _current_policy(self) -> str:
        """The version Serve answers with (the registry's current, e.g. after a rollback)."""
        current = self.policies.current()
        return str(current) if current is not None else self.cfg.rl.policy.name_or_path

    def _current_reward(self) -> str:
        current = self.rewards.current()
        return str(current) if current is not None else self.cfg.reward.model.name_or_path


def _outcome(record: CycleRecord) -> str:
    if record.policy_version:
        return f"published policy {record.policy_version}"
    if record.guard is not None and record.guard.refused:
        return f"refused by the publish guard: {'; '.join(record.guard.refused)}"
    return f"nothing published: {record.ppo}"


def _summary(metrics: IterationMetrics) -> PPOSummary:
    return PPOSummary(metrics.reward_mean, metrics.kl_mean, metrics.response_length_mean)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _write_documents(table: pa.Table, path: Path) -> int:
    """The stored documents as a PROMPTS JSONL file: the cycle's PPO input, kept for the record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = table.column("original_text").to_pylist()
    if not texts:
        raise InputError("store.url: the feedback database holds no documents for PPO; "
                         "people's /v1/compare requests store them")
    path.write_text("".join(json.dumps({"original_text": t}) + "\n" for t in texts))
    return len(texts)


def run_online(cfg: OnlineConfig) -> list[Cycle]:
    """Run the loop (resuming is automatic: the ledger says where it stopped)."""
    check_url(cfg.store.url)  # fail in seconds, before Ray starts
    init_ray()
    return OnlineLoop(cfg).run()

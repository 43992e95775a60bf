"""jobs/online.py: each cycle turns new human choices into a new served policy version.

The loop waits for K new choices, fixes the cycle's window, and drives the method's cycle
(``OnlineCycle``, rlhf.online.cycle): ``learn`` (update on the window, held-out gate, health), then
``publish`` (a guarded new version in the registry Serve watches). method=reward_model is
rlhf.online.reward_cycle (reward-model update, then RL with ``rl.ppo.advantage``'s estimator);
method=dpo is rlhf.online.dpo_cycle (a DPO update of the served policy, no reward model). The
ledger in the feedback database (rlhf.store.cycles) records each step before the next, which makes
the loop resumable; cycles.jsonl (each row also to the loop's experiment trackers) and the progress
lines are the loop's too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from rlhf.cli import tracked_run
from rlhf.errors import InputError
from rlhf.metrics import MetricsWriter, emit
from rlhf.online.config import OnlineConfig, OnlineMethod
from rlhf.online.cycle import CycleContext, OnlineCycle
from rlhf.online.dpo_cycle import DPOCycle
from rlhf.online.reward_cycle import RewardModelCycle
from rlhf.registry import PolicyRegistry
from rlhf.runtime import init_ray
from rlhf.store import Cycle, CycleLog, CycleRecord, FeedbackStore, check_url
from rlhf.store.tables import utcnow

CYCLES: dict[OnlineMethod, Callable[[CycleContext], OnlineCycle]] = {
    "reward_model": RewardModelCycle, "dpo": DPOCycle,
}


class FeedbackTimeout(InputError):
    """Not enough new feedback arrived within ``feedback.max_wait_s``."""


class OnlineLoop:
    """Runs cycles until ``cfg.cycles`` have finished; every step is recorded before the next."""

    def __init__(self, cfg: OnlineConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.store = FeedbackStore.from_config(cfg.store)
        self.ledger = CycleLog(self.store)
        self.policies = PolicyRegistry(cfg.registry)
        self.context = CycleContext(cfg, self.store, self.policies)
        self.method = CYCLES[cfg.method](self.context)

    def run(self) -> list[Cycle]:
        """Finish an interrupted cycle first, then start new ones; returns the cycles this call ran.
        Each finished cycle's row goes to cycles.jsonl and the trackers; at the end, the served policy
        goes to the trackers as the run's model."""
        trackers = tracked_run(self.cfg).open(self.output_dir)
        with MetricsWriter(self.output_dir, "cycle", trackers, file_name="cycles.jsonl") as log:
            ran: list[Cycle] = []
            while True:
                cycles = self.ledger.all()
                last = cycles[-1] if cycles else None
                finished = sum(c.done for c in cycles)
                if last is not None and not last.done:
                    emit(f"online: resuming cycle {last.cycle} at stage {last.stage}")
                    cycle = last
                elif self.cfg.cycles and finished >= self.cfg.cycles:
                    break
                else:
                    cycle = self.start_cycle(last)
                ran.append(self._finish(cycle, log))
            served = self.policies.current()
            if ran and served is not None:
                log.log_artifact(served)
        return ran

    def start_cycle(self, last: Cycle | None) -> Cycle:
        """Wait for K new choices after ``last``'s watermark, then fix the new cycle's window and what
        it starts from (the served policy, and what else the method continues from) in the ledger."""
        since = last.until if last is not None else None
        number = last.cycle + 1 if last is not None else 1
        new, until = self._wait_for_feedback(number, since)
        record = self.method.begin(CycleRecord(watermark_since=_iso(since), watermark_until=until.isoformat(),
                                               policy_before=self.context.current_policy()))
        emit(f"online: cycle {number} starts on {new} new choices in ({record.watermark_since}, "
             f"{record.watermark_until}]")
        return self.ledger.start(number, since, until, record)

    def _wait_for_feedback(self, number: int, since: datetime | None) -> tuple[int, datetime]:
        """(new choices, the window's end) once ``feedback.min_new`` choices were decided after ``since``."""
        fb = self.cfg.feedback
        started = time.monotonic()
        while True:
            until = utcnow() - timedelta(seconds=fb.settle_s)
            new = self.store.count_decided(since, until)
            if new >= fb.min_new:
                return new, until
            waited = time.monotonic() - started
            if fb.max_wait_s is not None and waited > fb.max_wait_s:
                raise FeedbackTimeout(f"feedback.max_wait_s: only {new} of {fb.min_new} new choices after "
                                      f"{waited:.0f} s; lower feedback.min_new or wait longer")
            emit(f"online: cycle {number} waiting for feedback: {new}/{fb.min_new} new choices")
            time.sleep(fb.poll_interval_s)

    def _finish(self, cycle: Cycle, log: MetricsWriter) -> Cycle:
        cycle_dir = self.output_dir / "cycles" / f"c{cycle.cycle:04d}"
        if cycle.stage == "started":
            cycle = self.ledger.advance(cycle.cycle, "reward_done", self.method.learn(cycle, cycle_dir))
        published = self._published_by(cycle)
        if published is not None:  # killed between publishing and recording it
            record = dataclasses.replace(cycle.record, policy_version=published,
                                         publish_skipped="published before a restart")
        else:
            record = self.method.publish(cycle, cycle_dir)
        cycle = self.ledger.advance(cycle.cycle, "done", record)
        log.write({"cycle": cycle.cycle, **record.to_record()})
        emit(f"online: cycle {cycle.cycle} done: {self.method.verdict(record)}, {_outcome(record)}")
        return cycle

    def _published_by(self, cycle: Cycle) -> str | None:
        """The version ``cycle`` published, if any: its metrics name the cycle and its window."""
        mark = {"cycle": cycle.cycle, "watermark_until": cycle.record.watermark_until}
        return next((version for version in reversed(self.policies.versions())
                     if mark.items() <= self.policies.metrics(version).items()), None)


def _outcome(record: CycleRecord) -> str:
    if record.policy_version:
        return f"published policy {record.policy_version}"
    if record.guard is not None and record.guard.refused:
        return f"refused by the publish guard: {'; '.join(record.guard.refused)}"
    return f"nothing published: {record.publish_skipped}"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def run_online(cfg: OnlineConfig) -> list[Cycle]:
    """Run the loop (resuming is automatic: the ledger says where it stopped)."""
    check_url(cfg.store.url)  # fail in seconds, before Ray starts
    init_ray()
    return OnlineLoop(cfg).run()

"""method=reward_model: continue-train the reward model on the window (+ replay), keep it unless
held-out accuracy fell, then ``rl.ppo.iterations`` RL iterations (``rl.ppo.advantage``'s estimator)
from the served policy on the stored documents, scored by the reward model the gate chose."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa

from rlhf.config.core import validate
from rlhf.config.sections import DataSourceConfig, ModelConfig
from rlhf.errors import InputError
from rlhf.metrics import IterationMetrics, emit
from rlhf.models.heads import load_reward_model
from rlhf.online.cycle import CycleContext, copy_of, recorded, verdict_line
from rlhf.online.scorer_health import ScorerHealth
from rlhf.online.window import FeedbackWindow
from rlhf.ppo.config import PPOConfig, PPORewardConfig
from rlhf.registry import PolicyRegistry
from rlhf.store import Cycle, CycleRecord, PPOSummary
from rlhf.train.reward import train_reward_model


class RewardModelCycle:
    """A reward-model update behind the held-out gate, then RL with the kept reward model."""

    def __init__(self, context: CycleContext):
        self.context = context
        self.cfg = context.cfg
        self.rewards = PolicyRegistry(self.cfg.reward_registry or context.output_dir / "reward_registry")

    def begin(self, record: CycleRecord) -> CycleRecord:
        """Fix the reward model the update continues from: the last kept version."""
        current = self.rewards.current()
        return dataclasses.replace(
            record, reward_before=str(current) if current is not None else self.cfg.reward.model.name_or_path
        )

    def learn(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """Continue-train from ``reward_before``; a kept update becomes the reward registry's next version,
        which later cycles continue from and Serve's active pair selection scores with."""
        base = recorded(cycle.record.reward_before, "reward_before")

        def train(training: pa.Table, validation: pa.Table) -> Path:
            settings = dataclasses.replace(self.cfg.reward, model=self._reward_config(base))
            return train_reward_model(settings, training, validation, str(cycle_dir / "reward"),
                                      self.context.seed(cycle)).model_dir

        update = self.context.judge_update(cycle, "reward update from", base, train, self.health)
        used = base
        if update.kept:
            metrics = {"cycle": cycle.cycle, "accuracy_before": update.record.accuracy_before,
                       "accuracy_after": update.record.accuracy_after}
            used = str(self.rewards.publish(copy_of(update.trained), metrics))
        return dataclasses.replace(update.record, reward_judged=update.judged, reward_kept=update.kept,
                                   reward_used=used)

    def health(self, reward: str, window: FeedbackWindow, probe: pa.Table) -> ScorerHealth:
        """The reward model ``reward`` on the held-out choices and the probe."""
        return self.context.measure(load_reward_model(self._reward_config(reward)).eval(), window, probe)

    def publish(self, cycle: Cycle, cycle_dir: Path) -> CycleRecord:
        """RL iterations from the cycle's starting policy on the stored documents with the reward model
        the update chose; the result (in the cycle's own candidates registry) is published if the
        guard passes it."""
        from rlhf.ppo.job import run_ppo  # Ray roles: imported only when a cycle gets this far

        documents = cycle_dir / "documents.jsonl"
        n_documents = _write_documents(self.context.store.documents_table(), documents)
        cfg = self._rl_config(cycle, cycle_dir, documents)
        emit(f"online: cycle {cycle.cycle} RL ({cfg.ppo.advantage}) from {cfg.policy.name_or_path}: "
             f"{cfg.ppo.iterations} iterations on {n_documents} stored documents")
        history = run_ppo(cfg)
        record = dataclasses.replace(cycle.record, documents=n_documents,
                                     candidate=str(PolicyRegistry(cfg.registry).latest()),
                                     ppo_first=_summary(history[0]), ppo_last=_summary(history[-1]))
        return self.context.publish(cycle, record)

    def _rl_config(self, cycle: Cycle, cycle_dir: Path, documents: Path) -> PPOConfig:
        """jobs/ppo.py's config for this cycle: ``rl`` from the cycle's starting policy, publishing once
        at the end into the cycle's candidates registry."""
        rl = self.cfg.rl
        training = dataclasses.replace(
            rl, policy=self.context.policy_config(cycle.record.policy_before),
            ppo=dataclasses.replace(rl.ppo, publish_every=rl.ppo.iterations),
        )
        reward_used = recorded(cycle.record.reward_used, "reward_used")
        cfg = PPOConfig.for_run(
            training, output_dir=str(cycle_dir / "ppo"), seed=self.context.seed(cycle),
            reward=PPORewardConfig(model=self._reward_config(reward_used), fn="", head=self.cfg.reward_head),
            prompts=DataSourceConfig(path=str(documents)), registry=str(cycle_dir / "candidates"),
        )
        validate(cfg)
        return cfg

    def verdict(self, record: CycleRecord) -> str:
        return verdict_line("reward", record, record.reward_kept)

    def _reward_config(self, name_or_path: str) -> ModelConfig:
        return dataclasses.replace(self.cfg.reward.model, name_or_path=name_or_path)


def _summary(metrics: IterationMetrics) -> PPOSummary:
    return PPOSummary(metrics.reward_mean, metrics.kl_mean, metrics.response_length_mean)


def _write_documents(table: pa.Table, path: Path) -> int:
    """The stored documents as a PROMPTS JSONL file: the cycle's RL input, kept for the record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = table.column("original_text").to_pylist()
    if not texts:
        raise InputError("store.url: the feedback database holds no documents for PPO; "
                         "people's /v1/compare requests store them")
    path.write_text("".join(json.dumps({"original_text": t}) + "\n" for t in texts))
    return len(texts)

"""Config tree of jobs/online.py: the cycle trigger, and the PPO and reward-training configs it embeds.

``rl`` and ``reward`` are the same sections jobs/ppo.py and jobs/reward.py use, so a cycle trains
exactly as those jobs would; each cycle sets only what is its own (output folders, seed, the
stored documents, the current reward model and policy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rlhf.config.core import option, validate
from rlhf.config.sections import RewardHead, StoreConfig
from rlhf.dpo.config import DPOAlgoConfig
from rlhf.ppo.config import PPOAlgoConfig, PPOTrainingConfig
from rlhf.train.config import RewardTrainingConfig, TrainConfig

# rm_ppo: reward-model update, then PPO; rm_grpo: the same with the GRPO estimator in the RL step;
# dpo: a DPO update of the served policy on the choices, no reward model.
OnlineMethod = Literal["rm_ppo", "dpo", "rm_grpo"]
KL_FIELDS = ("kl_in", "kl_kind")  # rl.ppo fields whose defaults depend on ppo.advantage


@dataclass
class FeedbackPolicyConfig:
    """When a cycle starts and which stored choices it trains and judges the reward model on."""

    min_new: int = option(32, "New labelled comparisons needed to start a cycle (K).", gt=0)
    poll_interval_s: float = option(10.0, "How often to count new comparisons while waiting.", gt=0)
    max_wait_s: float | None = option(
        None, "Give up waiting for feedback after this long (null = wait forever).", gt=0
    )
    settle_s: float = option(
        2.0, "A cycle takes choices recorded at least this long ago, so a write still committing "
        "(PostgreSQL) cannot land behind the watermark.", ge=0
    )
    replay_ratio: float = option(1.0, "Older comparisons replayed per new one in the reward update.", ge=0)
    holdout_fraction: float = option(
        0.2, "Share of comparisons (by id hash, stable across cycles) never trained on and used to "
        "judge the reward model.", ge=0, le=0.5
    )
    max_accuracy_drop: float = option(
        0.02, "Keep the updated reward model unless held-out accuracy fell by more than this.", ge=0
    )
    min_holdout: int = option(
        16, "Held-out choices needed before the accuracy gate applies; with fewer the update is kept "
        "(a handful of rows cannot tell two models apart).", ge=0
    )


@dataclass
class OnlineConfig:
    """jobs/online.py: people's choices -> reward model update -> PPO -> a new served policy version."""

    output_dir: str = option("runs/online", "Per-cycle reward/PPO runs, cycles.jsonl, reward versions.")
    method: OnlineMethod = option(
        "rm_ppo", "rm_ppo: update the reward model, then PPO; rm_grpo: the same with rl.ppo.advantage="
        "grpo (rl.ppo.samples_per_document summaries per document); dpo: a DPO update of the served "
        "policy on the new (+ replayed) choices, with the cycle's starting policy as reference, kept "
        "only if held-out implicit-reward accuracy holds."
    )
    seed: int = option(0, "Seed for replay sampling, training and generation (derived per cycle).")
    cycles: int = option(0, "Stop after this many finished cycles in total (0 = run until stopped).", ge=0)
    store: StoreConfig = option(factory=StoreConfig, help="The feedback database the Serve app writes.")
    registry: str = option("runs/ppo/registry", "Policy registry Serve reads; new versions go here.")
    reward_registry: str = option("", "Reward-model versions; empty = output_dir/reward_registry.")
    feedback: FeedbackPolicyConfig = option(factory=FeedbackPolicyConfig, help="Cycle trigger and data.")
    reward: RewardTrainingConfig = option(
        factory=lambda: RewardTrainingConfig(
            train=TrainConfig(lr=5e-4, max_steps=20, eval_every=20, save_every=20)
        ),
        help="Each cycle's reward update, as jobs/reward.py trains: reward.model is the starting reward "
        "model while reward_registry is empty; later updates continue from the last kept version.",
    )
    reward_head: RewardHead = option(
        "quality", "The reward-model score each cycle's PPO optimises and the held-out gate judges "
        "(jobs/ppo.py's reward.head): quality or total; a single-head model's one score is both."
    )
    rl: PPOTrainingConfig = option(
        factory=lambda: PPOTrainingConfig(ppo=PPOAlgoConfig(iterations=4)),
        help="Each cycle's PPO, as jobs/ppo.py trains: rl.policy is the starting policy while the "
        "registry is empty (its lengths apply to every version); rl.ppo.iterations per cycle.",
    )
    dpo: DPOAlgoConfig = option(
        factory=DPOAlgoConfig, help="method=dpo: each cycle's DPO objective, as jobs/dpo.py's dpo section."
    )
    dpo_train: TrainConfig = option(
        factory=lambda: TrainConfig(lr=5e-4, max_steps=20, eval_every=20, save_every=20),
        help="method=dpo: each cycle's DPO training (jobs/dpo.py's train); rl.policy gives the lengths.",
    )

    def rl_training(self) -> PPOTrainingConfig:
        """The RL step's settings: rl, with ppo.advantage=grpo for method=rm_grpo. A KL placement or
        estimator left at its default moves to GRPO's default (rlhf.ppo.config.DEFAULT_KL_IN)."""
        if self.method != "rm_grpo":
            return self.rl
        algo, default = dataclasses.replace(self.rl.ppo, advantage="grpo"), PPOAlgoConfig()
        set_here = frozenset(name for name in KL_FIELDS if getattr(algo, name) != getattr(default, name))
        return dataclasses.replace(self.rl, ppo=algo.with_given(set_here))

    def validate(self) -> None:
        if self.method == "rm_grpo":  # GRPO's own checks (k >= 2, no value model) before Ray starts
            validate(self.rl_training(), "rl.")

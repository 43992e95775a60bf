"""Config tree of jobs/online.py: the cycle trigger, and the RL, reward-training and DPO configs it embeds.

``rl``, ``reward`` and ``dpo``/``dpo_train`` are the same sections jobs/ppo.py, jobs/reward.py and
jobs/dpo.py use, so a cycle trains exactly as those jobs would (``rl.ppo.advantage`` picks the RL
estimator, and its KL defaults follow it as in jobs/ppo.py); each cycle sets only what is its own
(output folders, seed, the stored documents, the current reward model and policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.config.core import option
from rlhf.config.sections import RewardHead, StoreConfig, TrackingConfig
from rlhf.dpo.config import DPOAlgoConfig
from rlhf.ppo.config import PPOAlgoConfig, PPOTrainingConfig
from rlhf.train.config import RewardTrainingConfig, TrainConfig

# The algorithm family of a cycle (rlhf.online.reward_cycle, rlhf.online.dpo_cycle): reward_model
# updates the reward model, then runs RL with rl.ppo.advantage's estimator; dpo updates the served
# policy on the choices directly, with no reward model.
OnlineMethod = Literal["reward_model", "dpo"]
# feedback.unscored_labelers: what a cycle does with choices of labelers gold pairs cannot judge yet.
UnscoredLabelers = Literal["keep", "hold"]


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
    max_accuracy_drop: float = option(0.02, "Keep an update unless held-out accuracy fell by more than this.",
                                      ge=0)
    min_holdout: int = option(
        16, "Held-out choices needed before the accuracy gate applies; with fewer the update is kept "
        "(a handful of rows cannot tell two models apart).", ge=0
    )
    min_gold_accuracy: float = option(
        0.0, "Train and judge only on choices of labelers whose accuracy on gold pairs (serve.gold_rate) "
        "decided up to the window's end is at least this; 0 = off (every labeler's choices count).",
        ge=0, le=1
    )
    min_gold_answers: int = option(
        5, "Gold answers a labeler needs before min_gold_accuracy judges them; with fewer (and for "
        "'anonymous' choices) unscored_labelers decides.", gt=0
    )
    unscored_labelers: UnscoredLabelers = option(
        "keep", "With min_gold_accuracy on, what happens to choices of labelers with too few gold "
        "answers: keep (train on them) or hold (leave them out until the labeler is scored)."
    )


@dataclass
class HealthConfig:
    """What each cycle records about the reward model beside its held-out accuracy."""

    calibration_bins: int = option(
        10, "Equal-width bins of σ(r_1 − r_0) for the expected calibration error on held-out choices.", gt=0
    )
    probe_size: int = option(
        64, "(document, summary) pairs in the fixed probe every cycle's reward model scores (chosen once "
        "from the first cycle's window, held-out rows first, saved as output_dir/probe.jsonl); drift = "
        "1 − Spearman of the update's probe scores against those of the model it continued from.", gt=1
    )


@dataclass
class GuardConfig:
    """The checks a cycle's new policy passes before it is published (rlhf.online.guard); defaults
    catch gross reward hacking and leave the tiny default run alone."""

    enabled: bool = option(True, "Check the new policy against the served one before publishing.")
    documents: int = option(
        16, "First stored documents (the same every cycle) both policies summarise (greedy, at "
        "rl.ppo.max_new_tokens) for the length, repetition and unfinished checks.", gt=0
    )
    max_length_ratio: float = option(
        1.5, "Refuse when the new policy's mean summary length (tokens) exceeds the served one's by "
        "more than this factor.", gt=0
    )
    repetition_ngram: int = option(3, "Word n-gram size of the repetition share (1 - distinct/total).", gt=0)
    max_repetition_increase: float = option(
        0.1, "Refuse when the mean share of repeated word n-grams rose by more than this (absolute).", ge=0
    )
    max_unfinished_increase: float = option(
        0.2, "Refuse when the share of summaries that hit max_new_tokens without eos rose by more than "
        "this (absolute).", ge=0
    )
    min_win_rate: float = option(
        0.4, "Refuse when people preferred the served version in fewer than this share of its decided "
        "/v1/compare comparisons against another version.", ge=0, le=1
    )
    min_win_comparisons: int = option(
        20, "Decided comparisons of the served version against another one needed before min_win_rate "
        "applies; with fewer the check passes as 'not enough comparisons'.", gt=0
    )


@dataclass
class OnlineConfig:
    """jobs/online.py: people's choices -> reward-model update and RL, or a DPO update -> a new served
    policy version."""

    output_dir: str = option("runs/online", "Per-cycle reward/RL or DPO runs, cycles.jsonl, reward versions.")
    method: OnlineMethod = option(
        "reward_model", "reward_model: update the reward model, then RL from the served policy with "
        "rl.ppo.advantage's estimator (gae = PPO; grpo, rloo, reinforce_pp as in jobs/ppo.py); dpo: a "
        "DPO update of the served policy on the new (+ replayed) choices, with the cycle's starting "
        "policy as reference, kept only if held-out implicit-reward accuracy holds."
    )
    seed: int = option(0, "Seed for replay sampling, training and generation (derived per cycle).")
    cycles: int = option(0, "Stop after this many finished cycles in total (0 = run until stopped).", ge=0)
    store: StoreConfig = option(factory=StoreConfig, help="The feedback database the Serve app writes.")
    registry: str = option("runs/ppo/registry", "Policy registry Serve reads; new versions go here.")
    reward_registry: str = option("", "Reward-model versions; empty = output_dir/reward_registry.")
    feedback: FeedbackPolicyConfig = option(factory=FeedbackPolicyConfig, help="Cycle trigger and data.")
    health: HealthConfig = option(factory=HealthConfig, help="Reward-model calibration and drift per cycle.")
    guard: GuardConfig = option(factory=GuardConfig, help="Reward-hacking checks before publishing a policy.")
    reward: RewardTrainingConfig = option(
        factory=lambda: RewardTrainingConfig(
            train=TrainConfig(lr=5e-4, max_steps=20, eval_every=20, save_every=20)
        ),
        help="Each cycle's reward update, as jobs/reward.py trains: reward.model is the starting reward "
        "model while reward_registry is empty; later updates continue from the last kept version.",
    )
    reward_head: RewardHead = option(
        "quality", "The reward-model score each cycle's RL optimises and the held-out gate judges "
        "(jobs/ppo.py's reward.head): quality or total; a single-head model's one score is both."
    )
    rl: PPOTrainingConfig = option(
        factory=lambda: PPOTrainingConfig(ppo=PPOAlgoConfig(iterations=4)),
        help="Each cycle's RL (method=reward_model), as jobs/ppo.py trains, with rl.ppo.advantage's "
        "estimator: rl.policy is the starting policy while the registry is empty (its lengths apply to "
        "every version, also with method=dpo); rl.ppo.iterations per cycle.",
    )
    dpo: DPOAlgoConfig = option(
        factory=DPOAlgoConfig, help="method=dpo: each cycle's DPO objective, as jobs/dpo.py's dpo section."
    )
    dpo_train: TrainConfig = option(
        factory=lambda: TrainConfig(lr=5e-4, max_steps=20, eval_every=20, save_every=20),
        help="method=dpo: each cycle's DPO training (jobs/dpo.py's train); rl.policy gives the lengths.",
    )
    tracking: TrackingConfig = option(
        factory=TrackingConfig, help="Experiment trackers of the loop: cycles.jsonl rows (each cycle's "
        "own runs keep tensorboard only)."
    )


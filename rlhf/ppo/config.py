"""Config tree of jobs/ppo.py, and the part of it the online loop embeds (``PPOTrainingConfig``).

Defaults are the tiny offline setup. Cross-key checks (worker counts against batch sizes, the
weight-sync transport against fractional GPUs) run in config validation, so a bad combination
exits 2 before Ray starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhf.config.core import ConfigError, option
from rlhf.config.sections import (
    DataSourceConfig,
    DeepSpeedConfig,
    DType,
    LoraConfig,
    ModelConfig,
    RewardHead,
    TrackingConfig,
)
from rlhf.data import sample_source
from rlhf.ppo.estimators import (
    ESTIMATORS,
    AdvantageKind,
    Estimator,
    KLPlacement,
    estimators_help,
    kl_defaults_help,
)
from rlhf.ppo.functional import KLKind, LossAggregation
from rlhf.ppo.weight_sync import BUCKET_MB, WeightSync, resolve_transport

Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]  # Ray placement strategies
DEFAULT_REWARD_FN = "rlhf.ppo.rewards:brevity"
# The estimator unless ppo.kl_kind is given: k1 in the reward (its sum over tokens is the unbiased
# sequence KL); k3 in the loss (k1's gradient is zero in expectation, k3's pulls towards the reference).
DEFAULT_KL_KIND: dict[KLPlacement, KLKind] = {"reward": "k1", "loss": "k3"}


@dataclass
class PPOAlgoConfig:
    """The PPO algorithm: rollout sizes, losses, KL control and sampling."""

    iterations: int = option(12, "PPO iterations (generate -> score -> learn -> sync).", gt=0)
    advantage: AdvantageKind = option("gae", estimators_help())
    samples_per_document: int = option(
        1, "Summaries sampled per document (k, the group size); one document's rows are consecutive, "
        "so an iteration has rollout_batch_size x k summaries.", gt=0
    )
    scale_by_std: bool = option(True, "grpo: divide by the group's std (false = Dr. GRPO, no bias "
                                      "towards groups of similar scores).")
    rollout_batch_size: int = option(16, "Documents sampled per iteration.", gt=0)
    minibatch_size: int = option(
        8, "Summaries per optimizer step; divides rollout_batch_size x samples_per_document.", gt=0
    )
    epochs: int = option(4, "Passes over each rollout batch.", gt=0)
    async_rollout: bool = option(
        False, "One-step off-policy (AReaL, veRL, OpenRLHF's async mode): the next batch is sampled with "
        "the weights of one update ago while the learner trains on this one; the ratio uses the "
        "log-probs of the weights that sampled (the rollout worker computes them), and metrics record "
        "the lag. Ray roles overlap the two; local roles run the same steps one after another."
    )
    lr: float = option(
        1e-3, "Learning rate of policy and value model (tiny default; ~1e-5 for real models).", gt=0
    )
    max_grad_norm: float = option(1.0, "Clip the global gradient norm (0 = off).", ge=0)
    clip_eps: float = option(0.2, "Policy ratio clip range.", gt=0)
    value_clip_eps: float = option(0.2, "Value clip range around the rollout's values (gae).", gt=0)
    vf_coef: float = option(0.1, "Weight of the value loss (gae).", ge=0)
    entropy_coef: float = option(0.0, "Weight of the entropy bonus.", ge=0)
    gamma: float = option(1.0, "Discount (gae, reinforce_pp; grpo and rloo score whole summaries).",
                          gt=0, le=1)
    lam: float = option(0.95, "GAE lambda.", ge=0, le=1)
    kl_coef: float = option(0.02, "KL penalty coefficient (initial value when adaptive).", ge=0)
    kl_in: KLPlacement = option(
        "reward", "Where the KL to the reference enters: reward (a per-token penalty in the reward; "
        "grpo and rloo subtract each summary's summed penalty from its score before grouping) or "
        "loss (kl_coef x the kl_kind estimate added to the policy loss; the reward is not KL-shaped). "
        + kl_defaults_help()
    )
    kl_kind: KLKind = option("k1", "Per-token KL estimator. Unless given: k1 with kl_in=reward, k3 "
                                   "with kl_in=loss.")
    loss_aggregation: LossAggregation = option(
        "token_mean", "How the per-token policy loss becomes a scalar: token_mean (every token of the "
        "minibatch counts once) or sequence_mean (each summary's token mean, then their mean)."
    )
    kl_target: float | None = option(
        None, "Adaptive KL controller target (summed KL per sequence); null = fixed kl_coef.", gt=0
    )
    kl_horizon: int = option(
        320, "Adaptive KL controller horizon in samples (documents): the coefficient's time constant "
        "is kl_horizon / rollout_batch_size iterations (320 / 16 = 20); per iteration it moves by at "
        "most 20% * rollout_batch_size / kl_horizon (1%: +22% after 20 iterations at KL >= 1.2 x "
        "target). Scale it with rollout_batch_size to keep the same number of iterations.", gt=0
    )
    whiten_advantages: bool = option(True, "Normalise GAE advantages over the rollout batch (gae; "
                                           "reinforce_pp always whitens, grpo and rloo use their groups).")
    temperature: float = option(1.0, "Sampling temperature.", gt=0)
    top_p: float = option(1.0, "Nucleus sampling mass.", gt=0, le=1)
    max_new_tokens: int = option(32, "Longest summary in tokens.", gt=0)
    stop_at_eos: bool = option(
        True, "End a summary at EOS; false samples exactly max_new_tokens (fixed-length benchmarks)."
    )
    no_eos_penalty: float | None = option(
        None, "Score given instead of the reward to a summary that never emits EOS (null = off)."
    )
    checkpoint_every: int = option(5, "Checkpoint every N iterations (and at the end).", gt=0)
    publish_every: int = option(5, "Publish a policy version every N iterations (and at the end).", gt=0)

    @property
    def estimator(self) -> Estimator:
        """The registry entry ``advantage`` names: its advantage function and traits."""
        return ESTIMATORS[self.advantage]

    @property
    def uses_critic(self) -> bool:
        """Whether the estimator needs a value model (the learner loads one)."""
        return self.estimator.uses_critic

    @property
    def summaries_per_iteration(self) -> int:
        return self.rollout_batch_size * self.samples_per_document

    @property
    def single_update(self) -> bool:
        """One policy update per rollout, no critic, the KL in the loss and rollouts from the
        current weights (not ``async_rollout``): pi_old is then the policy the update starts from,
        so the learner's own forward (detached) gives it and no separate old-log-prob pass runs
        (TRL's ``num_iterations=1``)."""
        return (self.epochs == 1 and self.minibatch_size >= self.summaries_per_iteration
                and not self.uses_critic and self.kl_in == "loss" and not self.async_rollout)

    def with_given(self, given: frozenset[str]) -> PPOAlgoConfig:
        """The estimator's KL placement and the placement's estimator, where the user set neither."""
        kl_in = self.kl_in if "kl_in" in given else self.estimator.default_kl_in
        kl_kind = self.kl_kind if "kl_kind" in given else DEFAULT_KL_KIND[kl_in]
        return dataclasses.replace(self, kl_in=kl_in, kl_kind=kl_kind)

    def validate(self) -> None:
        if self.summaries_per_iteration % self.minibatch_size:
            raise ConfigError(
                "minibatch_size",
                f"{self.minibatch_size} must divide rollout_batch_size ({self.rollout_batch_size}) x "
                f"samples_per_document ({self.samples_per_document}), the summaries per iteration",
            )


@dataclass
class PPORewardConfig:
    """What scores a summary: a trained reward model or a rule-based Python function."""

    model: ModelConfig | None = option(
        None, "Reward-model checkpoint (from jobs/reward.py); its stored mean/std normalise rewards. "
        "Setting it replaces the default reward.fn."
    )
    fn: str = option(
        DEFAULT_REWARD_FN, "Rule-based reward instead of a model: package.module:function or "
        "path/file.py:function, called as fn(documents, summaries) -> list[float]; used unless "
        "reward.model is set."
    )
    normalize: bool = option(True, "Normalise reward-model scores with the stored mean/std.")
    head: RewardHead = option(
        "quality", "Which reward-model score RL optimises: quality (a disentangled model's length-free "
        "head) or total (quality + length, what the preferences were fitted with). A single-head "
        "model has one score, used for both."
    )

    def with_given(self, given: frozenset[str]) -> PPORewardConfig:
        """A reward model the user names replaces the default function (it is one or the other)."""
        if "model" in given and "fn" not in given and self.model is not None:
            return dataclasses.replace(self, fn="")
        return self

    def validate(self) -> None:
        if self.model is not None and self.fn:
            raise ConfigError("model", f"reward.model and reward.fn ({self.fn!r}) are both set; keep one")
        if self.model is None and not self.fn:
            raise ConfigError("fn", "no reward: set reward.model.name_or_path or reward.fn")
        target = self.fn.rpartition(":")[0]
        if target.endswith(".py") and not Path(target).is_file():
            raise ConfigError("fn", f"file not found: {target}")


@dataclass
class RolesConfig:
    """How many Ray actors play each role, and what they reserve (fractions share a device)."""

    placement: Placement = option("PACK", "Placement group strategy: PACK (colocate) or SPREAD (across "
                                          "nodes).")
    colocate: bool = option(
        False, "Every role in one Ray actor (veRL's hybrid engine, OpenRLHF's colocate_all_models): "
        "one process and one torch runtime instead of one per role, and a weight sync that is an "
        "in-process copy; the roles take turns on its roles.cpus_per_actor and roles.gpus_per_actor. "
        "For one machine or one GPU; needs one worker per role, and a failure ends the run (resume "
        "from its checkpoint) since no role restarts alone."
    )
    rollout_workers: int = option(1, "Generation actors, each with a policy copy.", gt=0)
    reward_workers: int = option(1, "Reward-model actors (a rule-based reward.fn runs in the driver).", gt=0)
    reference_workers: int = option(
        1, "Actors holding the frozen initial policy; none start with lora.r > 0 (the learners' base "
        "with the adapter off is the reference).", gt=0
    )
    learner_workers: int = option(1, "Data-parallel DeepSpeed learner ranks.", gt=0)
    cpus_per_actor: float = option(0.5, "CPUs reserved by each actor.", gt=0)
    threads_per_actor: int = option(
        0, "Torch threads in each actor; 0 = whole CPUs reserved (at least 1). The roles run one "
        "after another, so colocated actors may use more threads than they reserve.", ge=0
    )
    gpus_per_actor: float = option(
        0.0, "GPUs per actor; fractions (0.25) colocate roles on one GPU, 0 = CPU only.", ge=0
    )
    deepspeed: DeepSpeedConfig = option(factory=DeepSpeedConfig, help="The learner's ZeRO stage and offload.")
    dtype: DType = option(
        "auto", "Weights of every role, frozen and learner (DeepSpeed bf16): auto (bf16 on GPU, fp32 on "
        "CPU), bf16 or fp32."
    )
    forward_batch_size: int = option(
        0, "Rows per forward pass of reward scoring, reference and old log-probs/values (and of "
        "generation unless roles.generate_batch_size is set), and per forward+backward of an update "
        "(each actor's shard or minibatch is split into chunks "
        "of at most this many; results and gradients are joined as one pass would give): bounds "
        "activation memory for long documents. 0 = one pass. The update's rows are still "
        "ppo.minibatch_size.", ge=0
    )
    generate_batch_size: int = option(
        0, "Rows per generate call of a rollout worker (its shard is sampled in chunks of at most "
        "this many, in order after one seeding). 0 = as roles.forward_batch_size. Set it larger when "
        "memory allows: a decode step costs about the same for 32 rows as for 8 while the KV cache "
        "is small beside a full pass's logits (SmolLM2-135M PPO, 32 rows: chunks of 8 took 32 s "
        "to sample what one call samples in 15 s); keep it small for long encoder inputs.", ge=0
    )
    max_restarts: int = option(2, "Times Ray restarts a dead rollout/reward/reference actor.", ge=0)
    weight_sync: WeightSync = option(
        "auto", "How new weights reach the rollout workers: object_store (Ray objects), collective "
        "(a broadcast group: NCCL on GPU, gloo on CPU; needs a whole GPU per actor) or auto "
        "(collective unless actors share a GPU)."
    )
    sync_bucket_mb: float = option(
        BUCKET_MB, "Weight sync moves (and a ZeRO-3 learner gathers) the policy in buckets of at most "
        "this many MiB: the extra memory a sync needs on any rank.", gt=0
    )

    @property
    def rows_per_generate(self) -> int:
        """The chunk size generation uses (0: the whole shard)."""
        return self.generate_batch_size or self.forward_batch_size

    def validate(self) -> None:
        resolve_transport(self.weight_sync, self.gpus_per_actor)
        if self.colocate:
            counts = {"rollout_workers": self.rollout_workers, "reward_workers": self.reward_workers,
                      "reference_workers": self.reference_workers, "learner_workers": self.learner_workers}
            for name, count in counts.items():
                if count != 1:
                    raise ConfigError(name, f"{count} with roles.colocate=true, which runs one worker per "
                                            f"role in one actor; set roles.{name}=1 or roles.colocate=false")


@dataclass
class PPOTrainingConfig:
    """The policy, its algorithm and its actors: what jobs/ppo.py and each online cycle share."""

    policy: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-t5", max_source_length=256, max_target_length=32),
        help="Initial policy (an SFT checkpoint); also the frozen reference.",
    )
    value: ModelConfig | None = option(
        None, "Value model init (e.g. a reward checkpoint); null = the policy's backbone."
    )
    ppo: PPOAlgoConfig = option(factory=PPOAlgoConfig, help="The algorithm.")
    roles: RolesConfig = option(factory=RolesConfig, help="Ray actors and placement.")
    lora: LoraConfig = option(
        factory=LoraConfig, help="Adapters on the policy (and the value model's backbone): the learner "
        "trains them alone, a sync moves them alone, and the base with the adapter off is the reference. "
        "RL runs them without dropout (lora.dropout applies to SFT, reward and DPO training)."
    )

    @property
    def reference_actors(self) -> int:
        """Reference actors to start: none with adapters (the learners hold the base)."""
        return 0 if self.lora.r else self.roles.reference_workers

    def validate(self) -> None:
        algo = self.ppo
        if algo.estimator.needs_groups and algo.samples_per_document < 2:
            raise ConfigError(
                "ppo.samples_per_document",
                f"ppo.advantage={algo.advantage} needs >= 2 summaries per document for its group "
                f"baseline, got {algo.samples_per_document}; set ppo.samples_per_document=4, say",
            )
        if self.value is not None and not algo.uses_critic:
            raise ConfigError("value", f"ppo.advantage={algo.advantage} is critic-free and loads no value "
                                       "model; drop value or use ppo.advantage=gae")
        learners = self.roles.learner_workers
        if learners > 1 and self.ppo.minibatch_size % learners:
            raise ConfigError("roles.learner_workers",
                              f"{learners} must divide ppo.minibatch_size ({self.ppo.minibatch_size})")


@dataclass
class PPOConfig(PPOTrainingConfig):
    """jobs/ppo.py: RLHF with PPO across Ray actors."""

    output_dir: str = option("runs/ppo", "Checkpoints, metrics.jsonl, TensorBoard events, registry.")
    seed: int = option(0, "Seed for sampling, data order and init.")
    reward: PPORewardConfig = option(factory=PPORewardConfig, help="The reward.")
    prompts: DataSourceConfig = option(factory=lambda: sample_source("tldr_sft.jsonl"),
                                       help="Documents to summarise (any layout with a document column).")
    registry: str = option("", "Policy registry directory or URI; empty = output_dir/registry.")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="Experiment trackers (W&B, MLflow).")

    @property
    def reward_actors(self) -> int:
        """Reward actors to start: none for a rule-based reward.fn. A Python function scores the
        gathered rollout in the driver (as veRL's reward functions run in its trainer): an actor for
        it cost a process with torch and a reserved CPU to call it."""
        return 0 if self.reward.model is None else self.roles.reward_workers

    @property
    def actors(self) -> int:
        """Ray actors the roles start (one when colocated)."""
        r = self.roles
        if r.colocate:
            return 1
        return r.rollout_workers + self.reward_actors + self.reference_actors + r.learner_workers

    def validate(self) -> None:
        super().validate()
        if self.reward.model is None and self.roles.reward_workers != 1:
            raise ConfigError("roles.reward_workers", f"{self.roles.reward_workers} with the rule-based "
                              f"reward.fn ({self.reward.fn}), which scores in the driver; reward workers "
                              "hold a reward.model: set roles.reward_workers=1 or name a reward.model")

    @classmethod
    def for_run(
        cls, training: PPOTrainingConfig, *, output_dir: str, seed: int, reward: PPORewardConfig,
        prompts: DataSourceConfig, registry: str,
    ) -> PPOConfig:
        """A PPO run of ``training`` with the run-specific fields (e.g. an online cycle's)."""
        shared = {f.name: getattr(training, f.name) for f in dataclasses.fields(PPOTrainingConfig)}
        return cls(**shared, output_dir=output_dir, seed=seed, reward=reward, prompts=prompts,
                   registry=registry)

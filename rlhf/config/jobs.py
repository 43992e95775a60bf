"""The config tree of each job. Defaults are the tiny offline setup that runs on a laptop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import rlhf
from rlhf.config.core import ConfigError, option
from rlhf.config.sections import DataSourceConfig, ModelConfig, StoreConfig, TrainConfig

SAMPLES_DIR = Path(rlhf.__file__).parent / "data" / "samples"


def _sample(name: str) -> str:
    return str(SAMPLES_DIR / name)


@dataclass
class SFTConfig:
    """jobs/sft.py: supervised fine-tuning of the summarization policy."""

    output_dir: str = option("runs/sft", "Checkpoints, metrics.jsonl and the resolved config go here.")
    seed: int = option(0, "Seed for weights init, data order and sampling.")
    model: ModelConfig = option(factory=ModelConfig, help="The policy to fine-tune.")
    data: DataSourceConfig = option(
        factory=lambda: DataSourceConfig(path=_sample("tldr_sft.jsonl")),
        help="SFT pairs (original_text, summary).",
    )
    eval_data: DataSourceConfig | None = option(
        None, "Validation pairs; null holds out train.validation_fraction of data instead."
    )
    train: TrainConfig = option(factory=TrainConfig, help="Ray Train and DeepSpeed settings.")
    rouge_rows: int = option(8, "Validation documents summarised for ROUGE at each eval.", ge=0)


@dataclass
class AugmentConfig:
    """Synthetic preference pairs: a reference summary beats a corrupted copy of it."""

    data: DataSourceConfig | None = option(
        None, "SFT or article/abstract pairs to corrupt; null = no augmentation."
    )
    ratio: float = option(
        0.5, "Synthetic pairs per human comparison (0.5 = one synthetic for every two human).", ge=0
    )
    kinds: list[str] = option(
        factory=lambda: ["other_summary", "truncate", "shuffle", "repeat_tail", "random_tokens"],
        help="Corruptions to draw from: other_summary, truncate, shuffle, repeat_tail, random_tokens.",
    )

    def validate(self) -> None:
        from rlhf.data.augment import CORRUPTIONS

        for kind in self.kinds:
            if kind not in CORRUPTIONS:
                raise ConfigError("kinds", f"unknown corruption {kind!r}; use {', '.join(CORRUPTIONS)}")


@dataclass
class RewardConfig:
    """jobs/reward.py: Bradley-Terry reward model on human (and synthetic) comparisons."""

    output_dir: str = option("runs/reward", "Checkpoints, metrics.jsonl and the resolved config go here.")
    seed: int = option(0, "Seed for head init, data order and augmentation.")
    model: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-gpt2", max_source_length=384),
        help="Backbone of the reward model, or a reward checkpoint to continue from.",
    )
    data: DataSourceConfig | None = option(
        factory=lambda: DataSourceConfig(path=_sample("tldr_comparisons.jsonl")),
        help="Human comparisons (preference pairs); null trains on feedback/augmentation only.",
    )
    eval_data: DataSourceConfig | None = option(
        None, "Validation comparisons; null holds out train.validation_fraction of data instead."
    )
    from_store: bool = option(False, "Also train on the decided comparisons in the feedback database.")
    store: StoreConfig = option(factory=StoreConfig, help="The feedback database.")
    augment: AugmentConfig = option(factory=AugmentConfig, help="Synthetic preference pairs.")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=5e-4), help="Ray Train settings.")

    def validate(self) -> None:
        if self.data is None and not self.from_store and self.augment.data is None:
            raise ConfigError("data", "no training data: set data.path, from_store=true or augment.data.path")


@dataclass
class EvalConfig:
    """jobs/eval.py: reward-model accuracy and policy quality on held-out data."""

    output_dir: str = option("runs/eval", "eval.json and the resolved config go here.")
    seed: int = option(0, "Seed (generation is greedy; kept for a uniform interface).")
    reward_model: ModelConfig | None = option(
        None, "Reward checkpoint to evaluate on `comparisons`, and to score the policy's summaries."
    )
    comparisons: DataSourceConfig | None = option(None, "Preference pairs for reward-model accuracy.")
    policy: ModelConfig | None = option(None, "Policy checkpoint to evaluate on `references`.")
    references: DataSourceConfig | None = option(None, "SFT pairs: documents and reference summaries.")
    batch_size: int = option(16, "Rows per forward pass.", gt=0)

    def validate(self) -> None:
        if self.comparisons is not None and self.reward_model is None:
            raise ConfigError("reward_model", "comparisons need a reward_model.name_or_path to evaluate")
        if self.references is not None and self.policy is None:
            raise ConfigError("policy", "references need a policy.name_or_path to evaluate")
        if self.comparisons is None and self.references is None:
            raise ConfigError("comparisons", "nothing to evaluate: set comparisons.path or references.path")


@dataclass
class PPOAlgoConfig:
    """The PPO algorithm: rollout sizes, losses, KL control and sampling."""

    iterations: int = option(12, "PPO iterations (generate -> score -> learn -> sync).", gt=0)
    rollout_batch_size: int = option(16, "Documents sampled per iteration.", gt=0)
    minibatch_size: int = option(8, "Rows per optimizer step; divides rollout_batch_size.", gt=0)
    epochs: int = option(4, "Passes over each rollout batch.", gt=0)
    lr: float = option(
        1e-3, "Learning rate of policy and value model (tiny default; ~1e-5 for real models).", gt=0
    )
    max_grad_norm: float = option(1.0, "Clip the global gradient norm (0 = off).", ge=0)
    clip_eps: float = option(0.2, "Policy ratio clip range.", gt=0)
    value_clip_eps: float = option(0.2, "Value clip range around the rollout's values.", gt=0)
    vf_coef: float = option(0.1, "Weight of the value loss.", ge=0)
    entropy_coef: float = option(0.0, "Weight of the entropy bonus.", ge=0)
    gamma: float = option(1.0, "Discount.", gt=0, le=1)
    lam: float = option(0.95, "GAE lambda.", ge=0, le=1)
    kl_coef: float = option(0.02, "KL penalty coefficient (initial value when adaptive).", ge=0)
    kl_kind: str = option("k1", "Per-token KL estimator.", choices=("k1", "k2", "k3"))
    kl_target: float | None = option(
        None, "Adaptive KL controller target (summed KL per sequence); null = fixed kl_coef.", gt=0
    )
    kl_horizon: int = option(10000, "Adaptive KL controller horizon in samples.", gt=0)
    whiten_advantages: bool = option(True, "Normalise advantages over the rollout batch.")
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

    def validate(self) -> None:
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(
                "minibatch_size",
                f"{self.minibatch_size} must divide rollout_batch_size ({self.rollout_batch_size})",
            )


@dataclass
class PPORewardConfig:
    """What scores a summary: a trained reward model or a rule-based Python function."""

    model: ModelConfig | None = option(
        None, "Reward-model checkpoint (from jobs/reward.py); its stored mean/std normalise rewards."
    )
    fn: str = option(
        "", "Rule-based reward instead of a model: package.module:function or path/file.py:function, "
        "called as fn(documents, summaries) -> list[float]."
    )
    normalize: bool = option(True, "Normalise reward-model scores with the stored mean/std.")

    def validate(self) -> None:
        if (self.model is None) == (not self.fn):
            raise ConfigError(
                "fn", "set exactly one of reward.model.name_or_path and reward.fn "
                "(to use a reward model instead of the default function, also set reward.fn='')"
            )
        if self.fn:
            target = self.fn.rpartition(":")[0]
            if target.endswith(".py") and not Path(target).is_file():
                raise ConfigError("fn", f"file not found: {target}")


@dataclass
class RolesConfig:
    """How many Ray actors play each role, and what they reserve (fractions share a device)."""

    rollout_workers: int = option(1, "Generation actors, each with a policy copy.", gt=0)
    reward_workers: int = option(1, "Reward-scoring actors.", gt=0)
    reference_workers: int = option(1, "Actors holding the frozen initial policy.", gt=0)
    learner_workers: int = option(1, "Data-parallel DeepSpeed learner ranks.", gt=0)
    cpus_per_actor: float = option(0.5, "CPUs reserved by each actor.", gt=0)
    threads_per_actor: int = option(
        0, "Torch threads in each actor; 0 = whole CPUs reserved (at least 1). The roles run one "
        "after another, so colocated actors may use more threads than they reserve.", ge=0
    )
    gpus_per_actor: float = option(
        0.0, "GPUs per actor; fractions (0.25) colocate roles on one GPU, 0 = CPU only.", ge=0
    )
    placement: str = option(
        "PACK", "Placement group strategy: PACK (colocate) or SPREAD (across nodes).",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    )
    zero_stage: int = option(0, "Learner DeepSpeed ZeRO stage.", choices=(0, 1, 2, 3))
    offload_optimizer: bool = option(False, "Learner optimizer state in CPU memory.")
    offload_params: bool = option(False, "Learner parameters in CPU memory (ZeRO-3).")
    max_restarts: int = option(2, "Times Ray restarts a dead rollout/reward/reference actor.", ge=0)
    weight_sync: str = option(
        "auto", "How new weights reach the rollout workers: object_store (Ray objects), collective "
        "(a broadcast group: NCCL on GPU, gloo on CPU; needs a whole GPU per actor) or auto "
        "(collective unless actors share a GPU).", choices=("auto", "object_store", "collective"),
    )


@dataclass
class PPOConfig:
    """jobs/ppo.py: RLHF with PPO across Ray actors."""

    output_dir: str = option("runs/ppo", "Checkpoints, metrics.jsonl, TensorBoard events, registry.")
    seed: int = option(0, "Seed for sampling, data order and init.")
    policy: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-t5", max_source_length=256, max_target_length=32),
        help="Initial policy (an SFT checkpoint); also the frozen reference.",
    )
    value: ModelConfig | None = option(
        None, "Value model init (e.g. a reward checkpoint); null = the policy's backbone."
    )
    reward: PPORewardConfig = option(
        factory=lambda: PPORewardConfig(fn="rlhf.ppo.rewards:brevity"), help="The reward."
    )
    prompts: DataSourceConfig = option(
        factory=lambda: DataSourceConfig(path=_sample("tldr_sft.jsonl")),
        help="Documents to summarise (any layout with a document column).",
    )
    ppo: PPOAlgoConfig = option(factory=PPOAlgoConfig, help="The algorithm.")
    roles: RolesConfig = option(factory=RolesConfig, help="Ray actors and placement.")
    registry: str = option("", "Policy registry directory or URI; empty = output_dir/registry.")


@dataclass
class ServingConfig:
    """The Ray Serve application: HTTP, replicas, batching, limits and the comparison strategy."""

    host: str = option("127.0.0.1", "Address the HTTP proxy listens on (0.0.0.0 on a cluster head).")
    port: int = option(8000, "HTTP port.", gt=0, le=65535)
    replicas: int = option(1, "Policy replicas when autoscaling is off.", gt=0)
    autoscale: bool = option(False, "Scale policy replicas between min_replicas and max_replicas.")
    min_replicas: int = option(1, "Autoscaling lower bound.", ge=0)
    max_replicas: int = option(4, "Autoscaling upper bound.", gt=0)
    target_ongoing_requests: float = option(4.0, "Autoscaling target of queued+running requests "
                                                 "per replica.", gt=0)
    cpus_per_replica: float = option(1.0, "CPUs reserved by each policy replica.", gt=0)
    gpus_per_replica: float = option(0.0, "GPUs per policy replica (bf16 on GPU); 0 = CPU.", ge=0)
    threads_per_replica: int = option(0, "Torch threads per policy replica; 0 = its whole CPUs.", ge=0)
    max_batch_size: int = option(8, "Requests one policy replica generates for together "
                                    "(@serve.batch); 1 turns batching off.", gt=0)
    batch_wait_timeout_s: float = option(0.01, "How long a replica waits to fill a batch.", ge=0)
    max_new_tokens: int = option(64, "Summary length when a request does not say.", gt=0)
    max_text_bytes: int = option(200_000, "Hard limit on a text's UTF-8 size (413 above it); "
                                          "shorter texts that exceed the model's window are cut "
                                          "and flagged.", gt=0)
    max_upload_bytes: int = option(20_000_000, "Hard limit on an uploaded PDF (413 above it).", gt=0)
    compare_strategy: str = option(
        "previous", "What /v1/compare sets against the current policy: previous (the version "
        "before it), random_earlier (any earlier version), samples (two samples of the current "
        "one). With a single version every strategy uses samples.",
        choices=("previous", "random_earlier", "samples"),
    )
    temperature: float = option(1.0, "Sampling temperature of /v1/compare summaries (/v1/summarize "
                                     "is greedy).", gt=0)
    top_p: float = option(0.95, "Nucleus sampling mass of /v1/compare summaries.", gt=0, le=1)
    reload_interval_s: float = option(2.0, "How often replicas look for a newly published version.",
                                      gt=0)
    admin_token_env: str = option(
        "RLHF_ADMIN_TOKEN", "Environment variable holding the admin token (reload, export); admin "
        "routes answer 503 while it is unset."
    )

    def validate(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ConfigError("min_replicas", f"{self.min_replicas} exceeds max_replicas={self.max_replicas}")


@dataclass
class ServeConfig:
    """jobs/serve.py: the policy over HTTP, the comparison page, choices into the feedback database."""

    output_dir: str = option("runs/serve", "The resolved config is saved here.")
    seed: int = option(0, "Seed for the order summaries are shown in and for sampling.")
    registry: str = option("runs/ppo/registry", "Policy registry directory (jobs/ppo.py publishes into "
                                                "output_dir/registry); the newest version is served.")
    policy: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-t5", max_source_length=256, max_target_length=32),
        help="Served as version 'base' while the registry is empty; its lengths apply to every version.",
    )
    store: StoreConfig = option(factory=StoreConfig, help="Where comparisons and choices are stored.")
    serve: ServingConfig = option(factory=ServingConfig, help="HTTP, replicas, batching and limits.")


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
    seed: int = option(0, "Seed for replay sampling, training and generation (offset by the cycle).")
    cycles: int = option(0, "Stop after this many finished cycles in total (0 = run until stopped).", ge=0)
    store: StoreConfig = option(factory=StoreConfig, help="The feedback database the Serve app writes.")
    registry: str = option("runs/ppo/registry", "Policy registry Serve reads; new versions go here.")
    reward_registry: str = option("", "Reward-model versions; empty = output_dir/reward_registry.")
    policy: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-t5", max_source_length=256, max_target_length=32),
        help="Starting policy while the registry is empty; its lengths apply to every version.",
    )
    reward: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-gpt2", max_source_length=384),
        help="Starting reward model (a jobs/reward.py output) while reward_registry is empty.",
    )
    feedback: FeedbackPolicyConfig = option(factory=FeedbackPolicyConfig, help="Cycle trigger and data.")
    reward_train: TrainConfig = option(
        factory=lambda: TrainConfig(lr=5e-4, max_steps=20, eval_every=20, save_every=20),
        help="Ray Train settings of each reward update (continued from the last kept version).",
    )
    ppo: PPOAlgoConfig = option(
        factory=lambda: PPOAlgoConfig(iterations=4), help="PPO of each cycle (ppo.iterations = M)."
    )
    roles: RolesConfig = option(factory=RolesConfig, help="Ray actors of each cycle's PPO.")

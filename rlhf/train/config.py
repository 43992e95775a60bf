"""Config trees of the supervised jobs (jobs/sft.py, jobs/reward.py) and the loop they share.

Defaults are the tiny offline setup that runs on a laptop. ``RewardTrainingConfig`` is the part of
a reward run the online loop embeds as its ``reward`` section, so both train reward models the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.config.core import ConfigError, option
from rlhf.config.sections import (
    DataSourceConfig,
    DeepSpeedConfig,
    DType,
    LoraConfig,
    ModelConfig,
    RewardHeads,
    StoreConfig,
    TrackingConfig,
)
from rlhf.data import sample_source
from rlhf.data.augment import CorruptionKind

LRSchedule = Literal["linear", "cosine", "constant"]


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed settings of a supervised run (SFT, reward model)."""

    num_workers: int = option(1, "Ray Train workers (data-parallel ranks).", gt=0)
    use_gpu: bool = option(False, "One GPU per worker; false trains on CPU (see dtype).")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker.", gt=0)
    deepspeed: DeepSpeedConfig = option(factory=DeepSpeedConfig, help="ZeRO stage and CPU offload.")
    dtype: DType = option(
        "auto", "Training precision (DeepSpeed bf16): auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."
    )
    batch_size: int = option(8, "Micro-batch size per worker.", gt=0)
    grad_accum_steps: int = option(1, "Micro-batches per optimizer step.", gt=0)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0 = off).", ge=0)
    lr: float = option(1e-3, "Peak learning rate.", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0)
    warmup_steps: int = option(0, "Linear warmup steps from 0 to lr.", ge=0)
    lr_schedule: LRSchedule = option("linear", "Decay after warmup.")
    max_steps: int = option(40, "Optimizer steps to train.", gt=0)
    eval_every: int = option(20, "Validate every N steps (and at the end).", gt=0)
    save_every: int = option(20, "Checkpoint every N steps (and at the end).", gt=0)
    log_every: int = option(5, "Print a progress line every N steps.", gt=0)
    validation_fraction: float = option(
        0.1, "Share of the training rows held out for validation when no eval_data is given.",
        gt=0, le=0.5,
    )
    max_eval_rows: int = option(64, "Validate on at most this many held-out rows.", gt=0)


@dataclass
class SFTConfig:
    """jobs/sft.py: supervised fine-tuning of the summarization policy."""

    output_dir: str = option("runs/sft", "Checkpoints, metrics.jsonl and the resolved config go here.")
    seed: int = option(0, "Seed for weights init, data order and sampling.")
    model: ModelConfig = option(factory=ModelConfig, help="The policy to fine-tune.")
    data: DataSourceConfig = option(factory=lambda: sample_source("tldr_sft.jsonl"),
                                    help="SFT pairs (original_text, summary).")
    eval_data: DataSourceConfig | None = option(
        None, "Validation pairs; null holds out train.validation_fraction of data instead."
    )
    train: TrainConfig = option(factory=TrainConfig, help="Ray Train and DeepSpeed settings.")
    lora: LoraConfig = option(factory=LoraConfig, help="LoRA adapters instead of training every weight.")
    rouge_rows: int = option(8, "Validation documents summarised for ROUGE at each eval.", ge=0)
    show_summaries: int = option(
        0, "Print this many of those summaries (the same documents at every eval, the first before "
        "any training) to watch them change.", ge=0,
    )
    tracking: TrackingConfig = option(factory=TrackingConfig, help="Experiment trackers (W&B, MLflow).")

    def validate(self) -> None:
        if self.show_summaries > self.rouge_rows:
            raise ConfigError("show_summaries", f"shows some of the rouge_rows ({self.rouge_rows}) "
                              f"summaries; set it <= rouge_rows, got {self.show_summaries}")


@dataclass
class AugmentConfig:
    """Synthetic preference pairs: a reference summary beats a corrupted copy of it."""

    data: DataSourceConfig | None = option(
        None, "SFT or article/abstract pairs to corrupt; null = no augmentation."
    )
    ratio: float = option(
        0.5, "Synthetic pairs per human comparison (0.5 = one synthetic for every two human).", ge=0
    )
    kinds: list[CorruptionKind] = option(
        factory=lambda: ["other_summary", "truncate", "shuffle", "repeat_tail", "random_tokens"],
        help="Corruptions to draw from.",
    )

    def validate(self) -> None:
        if not self.kinds:
            raise ConfigError("kinds", "needs at least one corruption")


@dataclass
class RewardHeadsConfig:
    """The reward head layout and, for ODIN's two heads (Chen et al. 2024), its loss weights.

    Disentangled: loss = Bradley-Terry on quality + length + length_correlation_weight *
    (|rho(quality, L)| - rho(length, L)) + orthogonality_weight * |cos(w_quality, w_length)|, with
    rho the Pearson correlation over the micro-batch's 2B summaries and L their length in
    characters (see rlhf.train.disentangle).
    """

    layout: RewardHeads = option(
        "single", "single: one score; disentangled: quality and length heads on one backbone, "
        "trained so their sum fits the preferences and only the length head tracks summary length."
    )
    length_correlation_weight: float = option(
        1.0, "Weight of |rho(quality, length)| - rho(length score, length) (disentangled only).", ge=0
    )
    orthogonality_weight: float = option(
        1.0, "Weight of |cos| between the two heads' weight vectors (disentangled only).", ge=0
    )


@dataclass
class RewardTrainingConfig:
    """A reward model and how it trains: shared by jobs/reward.py and the online loop's update."""

    model: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-gpt2", max_source_length=384),
        help="Backbone of the reward model, or a reward checkpoint to continue from.",
    )
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=5e-4), help="Ray Train settings.")
    heads: RewardHeadsConfig = option(factory=RewardHeadsConfig, help="Head layout and its losses.")
    balance_longer: bool = option(
        False, "Reorder training pairs so each batch has as many pairs whose chosen summary is the "
        "longer as pairs where it is not (the smaller group is repeated to match), so length alone "
        "cannot fit a batch."
    )
    lora: LoraConfig = option(
        factory=LoraConfig, help="LoRA adapters on the backbone (the score heads train whole); the "
        "model is saved merged, a folder that loads without peft."
    )

    def validate(self) -> None:
        if (self.heads.layout == "disentangled" and self.heads.orthogonality_weight > 0
                and self.train.deepspeed.zero_stage == 3):
            raise ConfigError("heads.orthogonality_weight", "needs the whole head, which ZeRO-3 "
                              "partitions: set it to 0 or train.deepspeed.zero_stage <= 2")


@dataclass
class ComparisonSourcesConfig:
    """Where preference pairs come from: the sources of jobs/reward.py and jobs/dpo.py."""

    data: DataSourceConfig | None = option(
        factory=lambda: sample_source("tldr_comparisons.jsonl"),
        help="Human comparisons (preference pairs); null trains on the other sources only.",
    )
    eval_data: DataSourceConfig | None = option(
        None, "Validation comparisons; null holds out train.validation_fraction of data instead."
    )
    from_store: bool = option(False, "Also train on the decided comparisons in the feedback database.")
    store: StoreConfig = option(factory=StoreConfig, help="The feedback database.")


@dataclass
class RewardConfig(RewardTrainingConfig, ComparisonSourcesConfig):
    """jobs/reward.py: Bradley-Terry reward model on human (and synthetic) comparisons."""

    output_dir: str = option("runs/reward", "Checkpoints, metrics.jsonl and the resolved config go here.")
    seed: int = option(0, "Seed for head init, data order and augmentation.")
    augment: AugmentConfig = option(factory=AugmentConfig, help="Synthetic preference pairs.")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="Experiment trackers (W&B, MLflow).")

    def validate(self) -> None:
        super().validate()
        if self.data is None and not self.from_store and self.augment.data is None:
            raise ConfigError("data", "no training data: set data.path, from_store=true or augment.data.path")

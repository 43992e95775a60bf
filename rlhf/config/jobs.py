"""The config tree of each job. Defaults are the tiny offline setup that runs on a laptop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import rlhf
from rlhf.config.core import ConfigError, option
from rlhf.config.sections import DataSourceConfig, ModelConfig, TrainConfig

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
    augment: AugmentConfig = option(factory=AugmentConfig, help="Synthetic preference pairs.")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=5e-4), help="Ray Train settings.")

    def validate(self) -> None:
        if self.data is None and self.augment.data is None:
            raise ConfigError("data", "no training data: set data.path or augment.data.path")


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

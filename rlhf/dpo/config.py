"""Config tree of jobs/dpo.py, and the DPO section the online loop's ``method=dpo`` shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.config.core import ConfigError, option
from rlhf.config.sections import LoraConfig, ModelConfig, TrackingConfig
from rlhf.dpo.loss import DPOKind
from rlhf.train.config import ComparisonSourcesConfig, TrainConfig

ReferenceMode = Literal["cached", "online"]


@dataclass
class DPOAlgoConfig:
    """The DPO objective and where its reference log-probs come from."""

    beta: float = option(0.1, "Strength of the KL anchor to the reference: the implicit reward is "
                              "beta * (log pi - log pi_ref).", gt=0)
    loss: DPOKind = option("sigmoid", "sigmoid (DPO, Rafailov et al. 2023) or ipo (Azar et al. 2023: "
                                      "squared distance to a margin of 1 / (2 beta)).")
    label_smoothing: float = option(
        0.0, "Assumed share of flipped labels (cDPO), in [0, 0.5); sigmoid only.", ge=0
    )
    reference: ReferenceMode = option(
        "cached", "cached: each rank scores its pairs once with the policy before its first update "
        "(the initial weights are the reference; ZeRO-3 partitioned), so no second model is loaded; "
        "online: a frozen copy in each worker scores each batch."
    )
    dropout: bool = option(
        True, "Keep the checkpoint's dropout while training (as SFT does); false zeroes it (as the PPO "
        "roles do), so train-mode log-probs are the same function the reference and validation use."
    )

    def validate(self) -> None:
        if self.label_smoothing >= 0.5:
            raise ConfigError("label_smoothing", f"must be below 0.5, got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing", "applies to loss=sigmoid only; set it to 0 for ipo")


@dataclass
class DPOConfig(ComparisonSourcesConfig):
    """jobs/dpo.py: the policy trained directly on comparisons, with no reward model."""

    output_dir: str = option("runs/dpo", "Checkpoints, metrics.jsonl and the resolved config go here.")
    seed: int = option(0, "Seed for data order and the validation split.")
    model: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-t5", max_source_length=256, max_target_length=32),
        help="The policy to train (an SFT checkpoint); its initial weights are the frozen reference.",
    )
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=5e-4), help="Ray Train settings.")
    dpo: DPOAlgoConfig = option(factory=DPOAlgoConfig, help="The DPO objective and its reference.")
    lora: LoraConfig = option(
        factory=LoraConfig, help="LoRA adapters; with dpo.reference=online the base with the adapter "
        "off is the reference (no second copy)."
    )
    tracking: TrackingConfig = option(factory=TrackingConfig, help="Experiment trackers (W&B, MLflow).")

    def validate(self) -> None:
        if self.data is None and not self.from_store:
            raise ConfigError("data", "no training data: set data.path or from_store=true")

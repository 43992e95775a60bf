"""Config tree of jobs/eval.py: reward-model accuracy and policy quality on held-out data."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config.core import ConfigError, option
from rlhf.config.sections import DataSourceConfig, ModelConfig, RewardHead


@dataclass
class EvalConfig:
    """jobs/eval.py: reward-model accuracy and policy quality on held-out data."""

    output_dir: str = option(
        "runs/eval", "eval.json, summaries.jsonl (the policy's summaries beside the references) and the "
        "resolved config go here."
    )
    seed: int = option(0, "Seed (generation is greedy; kept for a uniform interface).")
    reward_model: ModelConfig | None = option(
        None, "Reward checkpoint to evaluate on `comparisons`, and to score the policy's summaries."
    )
    comparisons: DataSourceConfig | None = option(None, "Preference pairs for reward-model accuracy.")
    reward_head: RewardHead = option(
        "quality", "The score the accuracies and the policy's reward use: quality or total (a "
        "disentangled model's length-free head, or quality + length; a single-head model's one "
        "score is both). Length correlations are reported per head either way."
    )
    dpo_policy: ModelConfig | None = option(
        None, "A DPO policy to evaluate on `comparisons` as an implicit reward model: "
        "dpo_beta * (log pi(summary|document) - log pi_ref(summary|document))."
    )
    dpo_reference: ModelConfig | None = option(None, "The reference the DPO policy was trained against.")
    dpo_beta: float = option(0.1, "beta of the implicit reward (scales it; accuracies do not depend on it).",
                             gt=0)
    policy: ModelConfig | None = option(None, "Policy checkpoint to evaluate on `references`.")
    references: DataSourceConfig | None = option(None, "SFT pairs: documents and reference summaries.")
    batch_size: int = option(16, "Rows per forward pass.", gt=0)

    def validate(self) -> None:
        if self.comparisons is not None and self.reward_model is None and self.dpo_policy is None:
            raise ConfigError("reward_model", "comparisons need a reward_model.name_or_path or a "
                              "dpo_policy.name_or_path to evaluate")
        if self.dpo_policy is not None and self.dpo_reference is None:
            raise ConfigError("dpo_reference", "a dpo_policy needs the reference it was trained "
                              "against: set dpo_reference.name_or_path")
        if self.dpo_policy is not None and self.reward_model is not None and self.comparisons is not None:
            raise ConfigError("dpo_policy", "comparisons are scored by reward_model or by dpo_policy; "
                              "keep one")
        if self.references is not None and self.policy is None:
            raise ConfigError("policy", "references need a policy.name_or_path to evaluate")
        if self.comparisons is None and self.references is None:
            raise ConfigError("comparisons", "nothing to evaluate: set comparisons.path or references.path")

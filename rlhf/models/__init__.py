"""rlhf.models: the policy, reward and value models, tokenizers, and offline tiny presets."""

from rlhf.models.encoding import (
    CAUSAL_SEPARATOR,
    IGNORE_INDEX,
    Limits,
    ModelKind,
    limits_for,
    max_positions,
    model_kind,
)
from rlhf.models.heads import (
    RewardModel,
    ScalarHeadModel,
    ValueModel,
    load_reward_model,
    load_value_model,
)
from rlhf.models.policy import (
    Policy,
    enable_activation_checkpointing,
    inference_dtype,
    load_policy,
    resolve_dtype,
)
from rlhf.models.tiny import (
    TINY_PRESETS,
    build_tiny_backbone,
    build_tiny_lm,
    get_preset,
    is_tiny_preset,
)
from rlhf.models.tokenizer import load_tokenizer

__all__ = [
    "CAUSAL_SEPARATOR",
    "IGNORE_INDEX",
    "TINY_PRESETS",
    "Limits",
    "ModelKind",
    "Policy",
    "RewardModel",
    "ScalarHeadModel",
    "ValueModel",
    "build_tiny_backbone",
    "build_tiny_lm",
    "enable_activation_checkpointing",
    "get_preset",
    "inference_dtype",
    "is_tiny_preset",
    "limits_for",
    "load_policy",
    "load_reward_model",
    "load_tokenizer",
    "load_value_model",
    "max_positions",
    "model_kind",
    "resolve_dtype",
]

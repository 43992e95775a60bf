"""Dropout off in RL: the config rule per family, the loaders' option, and PPO's first ratio of 1.

Real checkpoints ship dropout 0.1 (the tiny presets 0), so these tests save tiny models whose
configs ask for dropout 0.3 and load them the way the PPO roles and the SFT/reward jobs do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BertConfig,
    ByT5Tokenizer,
    GPT2Config,
    LEDConfig,
    LlamaConfig,
    PretrainedConfig,
    T5Config,
)

from rlhf.config.core import load_config
from rlhf.config.sections import ModelConfig
from rlhf.models import get_preset, load_policy, load_reward_model, load_value_model
from rlhf.models.dropout import DROPOUT_MODULES, dropout_fields, without_dropout
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.roles import LocalRoles
from rlhf.ppo.trainer import PPOTrainer, PromptStream

P = 0.3
BART_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "classifier_dropout",
               "encoder_layerdrop", "decoder_layerdrop")
# Per family, every field the rule must find (hand-listed from the transformers configs).
FAMILY_FIELDS: dict[str, tuple[type[PretrainedConfig], tuple[str, ...]]] = {
    "t5": (T5Config, ("dropout_rate", "classifier_dropout")),
    "bart": (BartConfig, BART_FIELDS),
    "led": (LEDConfig, BART_FIELDS),
    "gpt2": (GPT2Config, ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")),
    "llama": (LlamaConfig, ("attention_dropout",)),
    "bert": (BertConfig, ("hidden_dropout_prob", "attention_probs_dropout_prob")),  # MiniLM reward
}
PRESET_FIELDS = {"tiny-t5": "t5", "tiny-bart": "bart", "tiny-gpt2": "gpt2", "tiny-llama": "llama"}
DOCS = ["the landlord kept the deposit and the flat had mould", "a short post"]
SUMMARIES = ["deposit kept", "short"]


@pytest.mark.parametrize("family", sorted(FAMILY_FIELDS))
def test_without_dropout_zeroes_exactly_the_dropout_fields(family: str) -> None:
    config_class, fields = FAMILY_FIELDS[family]
    config = config_class(**dict.fromkeys(fields, P))
    assert dropout_fields(config) == dict.fromkeys(fields, P)
    before = config.to_dict()
    assert without_dropout(config) is config
    after = config.to_dict()
    assert {k: after[k] for k in fields} == dict.fromkeys(fields, 0.0)
    assert {k: v for k, v in after.items() if k not in fields} == {
        k: v for k, v in before.items() if k not in fields
    }


def test_rule_skips_bools_and_unset_values() -> None:
    config = BertConfig(classifier_dropout=None)
    config.use_dropout = True  # a switch, not a probability
    without_dropout(config)
    assert config.classifier_dropout is None and config.use_dropout is True


def _save_with_dropout(preset: str, folder: Path) -> Path:
    """``preset``'s model with every dropout field of its family at P, saved as an HF folder."""
    spec = get_preset(preset)
    config = spec.make_config()
    for name in FAMILY_FIELDS[PRESET_FIELDS[preset]][1]:
        setattr(config, name, P)
    torch.manual_seed(0)
    spec.lm_class(config).save_pretrained(str(folder))
    ByT5Tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelConfig]:
    root = tmp_path_factory.mktemp("dropout")
    return {preset: ModelConfig(name_or_path=str(_save_with_dropout(preset, root / preset)),
                                max_source_length=64, max_target_length=16)
            for preset in PRESET_FIELDS}


def _dropout_left(model: nn.Module) -> dict[str, float]:
    """Nonzero dropout of ``model``: config fields (with sub-configs) and modules."""
    left = {k: v for k, v in dropout_fields(model.config).items() if v}
    left.update({name: m.p for name, m in model.named_modules() if isinstance(m, DROPOUT_MODULES) and m.p})
    return left


def _train_mode_outputs_equal(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    model.train()
    with torch.no_grad():
        first, second = model(**batch), model(**batch)
    if not isinstance(first, torch.Tensor):
        first, second = first.logits, second.logits
    return torch.equal(first, second)


@pytest.mark.parametrize("preset", sorted(PRESET_FIELDS))
def test_policy_loader_turns_dropout_off_only_when_asked(saved: dict[str, ModelConfig], preset: str) -> None:
    rl = load_policy(saved[preset], dropout=False)
    assert _dropout_left(rl.model) == {}
    assert _train_mode_outputs_equal(rl.model, rl.encode_pairs(DOCS, SUMMARIES))
    sft = load_policy(saved[preset])  # SFT keeps the checkpoint's dropout
    fields = FAMILY_FIELDS[PRESET_FIELDS[preset]][1]
    kept = {k: v for k, v in dropout_fields(sft.model.config).items() if k in fields}
    assert kept == dict.fromkeys(fields, P)
    assert not _train_mode_outputs_equal(sft.model, sft.encode_pairs(DOCS, SUMMARIES))


def test_a_policy_saved_from_an_rl_role_keeps_the_checkpoints_dropout(
    saved: dict[str, ModelConfig], tmp_path: Path
) -> None:
    """A published PPO version is the same model for a later SFT run; the RL copy stays at 0."""
    rl = load_policy(saved["tiny-bart"], dropout=False)
    rl.save(tmp_path / "published")
    fields = FAMILY_FIELDS[PRESET_FIELDS["tiny-bart"]][1]
    republished = load_policy(ModelConfig(name_or_path=str(tmp_path / "published")))
    assert {k: v for k, v in dropout_fields(republished.model.config).items() if k in fields} == \
        dict.fromkeys(fields, P)
    assert _dropout_left(rl.model) == {}  # saving did not turn it back on in the running copy
    assert _train_mode_outputs_equal(rl.model, rl.encode_pairs(DOCS, SUMMARIES))


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-gpt2"])
def test_scalar_head_loaders_turn_dropout_off_only_when_asked(
    saved: dict[str, ModelConfig], preset: str
) -> None:
    for load in (load_value_model, load_reward_model):
        rl = load(saved[preset], dropout=False)
        assert _dropout_left(rl.backbone) == {}
        assert _train_mode_outputs_equal(rl, rl.encode_pairs(DOCS, SUMMARIES))
    reward = load_reward_model(saved[preset])  # reward training keeps it
    assert max(dropout_fields(reward.backbone.config).values()) == P
    assert not _train_mode_outputs_equal(reward, reward.encode_pairs(DOCS, SUMMARIES))


def test_first_ppo_update_of_a_dropout_checkpoint_has_ratio_one(tmp_path: Path) -> None:
    """Old log-probs (eval mode) and the update's (train mode) agree exactly before any step."""
    policy = _save_with_dropout("tiny-t5", tmp_path / "policy")
    cfg = load_config(PPOConfig, None, [
        f"output_dir={tmp_path / 'run'}", f"policy.name_or_path={policy}", "policy.max_source_length=96",
        "ppo.iterations=1", "ppo.epochs=1", "ppo.rollout_batch_size=8", "ppo.minibatch_size=8",
        "ppo.lr=1e-9", "ppo.max_new_tokens=12", "ppo.checkpoint_every=100", "ppo.publish_every=100",
    ])
    torch.manual_seed(0)
    documents = [f"post {i}: my landlord kept the deposit and the flat had mould" for i in range(8)]
    stream = PromptStream(lambda epoch: iter(documents))
    [metrics] = PPOTrainer(cfg, LocalRoles(cfg), stream, log=lambda m: None).run()
    assert metrics.clip_fraction == 0.0
    assert abs(metrics.approx_kl) < 1e-6

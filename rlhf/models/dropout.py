"""Dropout off for RL: the one rule every PPO role's loader applies.

PPO's ratio pi/pi_old compares a train-mode forward pass with eval-mode old log-probs; with
dropout on, the ratio is noise even before any update (0.87-1.12 at p=0.1), which inflates the
clip fraction and biases the gradient. Eval mode during updates is no fix (Hugging Face turns
gradient checkpointing off outside train mode), so the probabilities themselves go to 0.

Rule: a config attribute is a dropout probability when its name contains ``dropout`` (T5
``dropout_rate``; BART/LED ``dropout``, ``attention_dropout``, ``activation_dropout``,
``classifier_dropout``; Llama ``attention_dropout``; BERT/MiniLM ``hidden_dropout_prob``,
``attention_probs_dropout_prob``), ends in ``pdrop`` (GPT-2 ``resid_pdrop``, ``embd_pdrop``,
``attn_pdrop``) or contains ``layerdrop`` (BART/LED ``encoder_layerdrop``/``decoder_layerdrop``:
random layer skipping), and its value is a number (not a bool, not None). Sub-configs (a
composite model's ``text_config`` ...) are walked too.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TypeVar

from torch import nn
from transformers import AutoConfig, PretrainedConfig

ModuleT = TypeVar("ModuleT", bound=nn.Module)

DROPOUT_FIELD = re.compile(r"dropout|pdrop$|layerdrop")
DROPOUT_MODULES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)


def is_dropout_field(name: str, value: object) -> bool:
    """True for a config attribute the rule treats as a dropout probability."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return is_number and DROPOUT_FIELD.search(name) is not None


def dropout_fields(config: PretrainedConfig, prefix: str = "") -> dict[str, float]:
    """Every dropout probability of ``config`` and its sub-configs, by dotted name."""
    found: dict[str, float] = {}
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            found.update(dropout_fields(value, f"{prefix}{name}."))
        elif is_dropout_field(name, value):
            found[prefix + name] = float(value)
    return found


def without_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with every dropout probability set to 0.0, in place (returned for chaining).

    Must run before the model is built: several families copy the probability into a plain
    float attribute at init (BART/LED attention ``self.dropout``, Llama ``attention_dropout``)
    that no ``nn.Dropout`` module exposes afterwards.
    """
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            without_dropout(value)
        elif is_dropout_field(name, value):
            setattr(config, name, 0.0)
    return config


def checkpoint_config(name_or_path: str, dropout: bool) -> tuple[PretrainedConfig, dict[str, float]]:
    """(config, the dropout probabilities zeroed in it): the checkpoint's config as it is, or with
    ``dropout`` False (RL roles) without its dropout, for ``from_pretrained(config=...)``."""
    config = AutoConfig.from_pretrained(name_or_path)
    if dropout:
        return config, {}
    zeroed = dropout_fields(config)
    return without_dropout(config), zeroed


def disable_dropout_modules(model: ModuleT) -> ModuleT:
    """Set ``p = 0`` on every dropout module of ``model`` (custom code may ignore the config)."""
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
    return model


def _set_fields(config: PretrainedConfig, values: dict[str, float]) -> None:
    for dotted, value in values.items():
        *parents, name = dotted.split(".")
        target = config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)


@contextlib.contextmanager
def checkpoint_dropout_restored(config: PretrainedConfig, checkpoint: dict[str, float]) -> Iterator[None]:
    """While open, ``config`` carries the checkpoint's dropout (``dropout_fields`` of it before
    ``without_dropout``), so a model saved from an RL role keeps it for a later SFT run; the
    built modules are not touched, and the zeros come back on exit."""
    _set_fields(config, checkpoint)
    try:
        yield
    finally:
        _set_fields(config, dict.fromkeys(checkpoint, 0.0))

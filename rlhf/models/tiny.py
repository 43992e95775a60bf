"""Offline tiny presets: random-weight models small enough for a CPU test step in milliseconds.

Every preset uses ``transformers.ByT5Tokenizer()`` (bytes + 3 specials, vocabulary 384), which needs
no files, so the special ids below are ByT5's: pad 0, eos 1, no bos. Seq2seq presets start the
decoder with pad, as T5 does; causal presets have no bos either, so a prompt starts with its first
byte. Dropout is 0 so that a tiny model in train mode is still deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModel,
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LEDConfig,
    LEDForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from rlhf.models.dropout import without_dropout

VOCAB_SIZE = 384  # len(ByT5Tokenizer())
PAD_ID = 0
EOS_ID = 1
HIDDEN = 64
LAYERS = 2
HEADS = 4
FFN = 128
MAX_POSITIONS = 512

# Any: the config classes accept keys beyond their declared fields (T5Config declares no bos or
# decoder start id), so these keywords cannot be checked against the typed signatures.
_SPECIAL: dict[str, Any] = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID}
_SEQ2SEQ_SPECIAL: dict[str, Any] = {**_SPECIAL, "bos_token_id": None, "decoder_start_token_id": PAD_ID}


@dataclass(frozen=True)
class TinyPreset:
    """How to build one preset: its config and its language-model class."""

    make_config: Callable[[], PretrainedConfig]
    lm_class: type[PreTrainedModel]


def _t5() -> PretrainedConfig:
    return T5Config(
        vocab_size=VOCAB_SIZE, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
        dropout_rate=0.0, feed_forward_proj="relu", **_SEQ2SEQ_SPECIAL,
    )


def _bart_like(config_class: Callable[..., PretrainedConfig], **extra: int) -> PretrainedConfig:
    """BART and LED share their field names; forced_bos is off since ByT5 has no bos."""
    return config_class(
        vocab_size=VOCAB_SIZE, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        forced_bos_token_id=None, forced_eos_token_id=EOS_ID, **_SEQ2SEQ_SPECIAL, **extra,
    )


def _bart() -> PretrainedConfig:
    return _bart_like(BartConfig, max_position_embeddings=MAX_POSITIONS)


def _led() -> PretrainedConfig:
    # A 16-token local window makes the sliding-window code path run even on short test inputs.
    return _bart_like(
        LEDConfig, max_encoder_position_embeddings=1024,
        max_decoder_position_embeddings=MAX_POSITIONS, attention_window=16,
    )


def _gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
        n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS_ID,
        **_SPECIAL,
    )


def _llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS // 2,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, bos_token_id=None,
        **_SPECIAL,
    )


TINY_PRESETS: dict[str, TinyPreset] = {
    "tiny-t5": TinyPreset(_t5, T5ForConditionalGeneration),
    "tiny-bart": TinyPreset(_bart, BartForConditionalGeneration),
    "tiny-led": TinyPreset(_led, LEDForConditionalGeneration),
    "tiny-gpt2": TinyPreset(_gpt2, GPT2LMHeadModel),
    "tiny-llama": TinyPreset(_llama, LlamaForCausalLM),
}


def is_tiny_preset(name: str) -> bool:
    """True for a preset name; anything else is a hub name or a folder."""
    return name in TINY_PRESETS


def get_preset(name: str) -> TinyPreset:
    """The preset called ``name``; the error lists the valid names."""
    try:
        return TINY_PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(TINY_PRESETS))
        raise ValueError(f"unknown tiny preset {name!r}; valid presets: {valid}") from None


def _preset_config(name: str, dropout: bool) -> PretrainedConfig:
    config = get_preset(name).make_config()
    return config if dropout else without_dropout(config)


def build_tiny_lm(name: str, seed: int = 0, dropout: bool = True) -> PreTrainedModel:
    """The preset's language model (seq2seq or causal), same weights for the same seed.

    ``dropout`` False applies the RL rule of ``rlhf.models.dropout`` (presets ship 0 anyway).
    """
    preset = get_preset(name)
    config = _preset_config(name, dropout)
    torch.manual_seed(seed)
    # The constructor, not _from_config: under ZeRO-3, _from_config initialises inside
    # deepspeed.zero.Init, which draws other random values than the frozen copies get from the same
    # seed (the reference would differ from the policy before any update). DeepSpeed partitions the
    # built model in deepspeed.initialize instead.
    return preset.lm_class(config).eval()


def build_tiny_backbone(name: str, seed: int = 0, dropout: bool = True) -> PreTrainedModel:
    """The preset's base model without the LM head (T5Model, GPT2Model, ...), for scalar heads."""
    config = _preset_config(name, dropout)
    torch.manual_seed(seed)
    return AutoModel.from_config(config).eval()

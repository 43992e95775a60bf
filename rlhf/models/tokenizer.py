"""Tokenizer loading for presets, our saved folders, and hub names."""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from rlhf.models.tiny import is_tiny_preset


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer for a preset (ByT5, no files), a saved folder, or a hub name.

    A folder we saved holds ByT5's ``tokenizer_config.json``, which AutoTokenizer reads back as a
    ByT5Tokenizer, so folders and hub names share one path. Causal LMs often have no pad token
    (GPT-2, Llama): eos stands in, which is safe because every batch carries an attention mask and
    labels never read padding. Padding is on the right (training); generation pads prompts on the
    left explicitly at the call site rather than flipping this shared setting.
    """
    tokenizer: PreTrainedTokenizerBase
    if is_tiny_preset(name_or_path):
        tokenizer = ByT5Tokenizer()
    else:
        tokenizer = _faithful(AutoTokenizer.from_pretrained(name_or_path), name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _faithful(tokenizer: PreTrainedTokenizerBase, name_or_path: str) -> PreTrainedTokenizerBase:
    """The class a folder's ``tokenizer_config.json`` names, where AutoTokenizer chose another.

    transformers 5 prefers the model type's tokenizer (Qwen2Tokenizer for a Qwen2 config) over the
    saved class; without its vocabulary files that tokenizer encodes every text to nothing.
    """
    config = Path(name_or_path) / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if not saved or saved.removesuffix("Fast") == type(tokenizer).__name__.removesuffix("Fast"):
        return tokenizer
    return getattr(transformers, saved).from_pretrained(name_or_path)

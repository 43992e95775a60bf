"""Real architectures' sizes with random weights: the models benchmarks run where no hub is reachable.

Each is saved as a Hugging Face folder with the byte-level ``ByT5Tokenizer`` (ids 0-383, pad 0,
eos 1), so every loader in ``rlhf.models`` takes it by path. The byte tokenizer uses a small
corner of the real vocabularies; speed and memory depend on the sizes, not on the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LEDConfig,
    LEDForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
)

from rlhf.models.tiny import EOS_ID, PAD_ID

ATTENTION_WINDOW = 1024  # LED's local attention window (each side sees half)


@dataclass(frozen=True)
class LedSize:
    """The sizes that differ between LED checkpoints (encoder and decoder alike)."""

    d_model: int
    layers: int
    heads: int
    ffn: int
    window: int = ATTENTION_WINDOW


LED_SIZES = {
    "allenai/led-base-16384": LedSize(d_model=768, layers=6, heads=12, ffn=3072),
    "allenai/led-large-16384": LedSize(d_model=1024, layers=12, heads=16, ffn=4096),
    "tiny-led": LedSize(d_model=64, layers=2, heads=4, ffn=128, window=32),
}


def led_config(size: LedSize, encoder_layers: int | None = None, decoder_layers: int | None = None,
               vocab_size: int = 50265) -> LEDConfig:
    """An LEDConfig with the hub checkpoint's sizes (positions, window) and the given depth."""
    encoder_layers = size.layers if encoder_layers is None else encoder_layers
    return LEDConfig(
        vocab_size=vocab_size, d_model=size.d_model, encoder_layers=encoder_layers,
        decoder_layers=size.layers if decoder_layers is None else decoder_layers,
        encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn, decoder_ffn_dim=size.ffn,
        max_encoder_position_embeddings=16384, max_decoder_position_embeddings=1024,
        attention_window=[size.window] * encoder_layers,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None, decoder_start_token_id=PAD_ID,
    )


def gpt2_config(n_embd: int, n_layer: int, n_head: int, vocab_size: int, n_positions: int) -> GPT2Config:
    return GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size,
                      n_positions=n_positions, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                      bos_token_id=EOS_ID)


ARCHITECTURES: dict[str, tuple[type[PreTrainedModel], PretrainedConfig]] = {
    "led-base": (LEDForConditionalGeneration, led_config(LED_SIZES["allenai/led-base-16384"])),
    "led-large": (LEDForConditionalGeneration, led_config(LED_SIZES["allenai/led-large-16384"])),
    "gpt2-125m": (GPT2LMHeadModel, gpt2_config(768, 12, 12, 50257, 1024)),
    "tiny-led": (LEDForConditionalGeneration, led_config(LED_SIZES["tiny-led"], vocab_size=384)),
    "tiny-gpt2": (GPT2LMHeadModel, gpt2_config(128, 2, 4, 384, 512)),
}


def save_random(name: str, folder: Path, seed: int = 0) -> tuple[Path, int]:
    """Architecture ``name`` with seeded random weights saved under ``folder``; (path, parameters)."""
    lm_class, config = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = lm_class(config)
    path = folder / name
    model.save_pretrained(str(path))
    ByT5Tokenizer().save_pretrained(str(path))
    return path, sum(p.numel() for p in model.parameters())

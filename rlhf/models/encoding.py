"""Turning (document, summary) text into model inputs, shared by the policy and the scalar heads.

One rule everywhere: only the document is ever cut to fit a length limit. A summary is cut only to
``max_target_length`` (its own limit), never to make room for a document, because the summary is
what is trained on or scored. Documents keep their beginning (they are cut on the right): news
and papers put the main point first, and this matches what hub tokenizers do by default.

Each encoder logs ONE warning per call with how many documents were cut, rather than one per
document, so a long dataset does not flood the log.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import cast

import torch
from transformers import BatchEncoding, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
# Causal prompt = document + separator; the summary follows it. This is the ending of the OpenAI
# summarize_from_feedback prompts, so hub checkpoints tuned on them see a familiar format.
CAUSAL_SEPARATOR = "\nTL;DR:"


class ModelKind(str, Enum):
    """How a backbone reads a (document, summary) pair."""

    ENCODER = "encoder"  # BERT/MiniLM: "[CLS] summary [SEP] document [SEP]"
    DECODER = "decoder"  # GPT-2/Llama: "document\nTL;DR: summary<eos>"
    ENCODER_DECODER = "encoder_decoder"  # T5/BART/LED: document -> encoder, summary -> decoder


def model_kind(config: PretrainedConfig) -> ModelKind:
    """The kind from the model's config alone, so a folder or hub name needs no extra flag.

    Masked-LM model types (bert, roberta, ...) are encoders; BERT also has a causal-LM class, so
    the causal-LM mapping cannot tell them apart. Everything else that is not seq2seq is causal.
    """
    if config.is_encoder_decoder:
        return ModelKind.ENCODER_DECODER
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return ModelKind.ENCODER
    return ModelKind.DECODER


def max_positions(config: PretrainedConfig) -> int | None:
    """Longest input the model's position embeddings allow (encoder side); None if unbounded (T5)."""
    for name in ("max_encoder_position_embeddings", "n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class Limits:
    """Token limits after the model's own limit is applied.

    ``source``: encoder input (seq2seq), whole prompt (causal), or whole pair (encoder-only).
    ``target``: summary tokens including the closing eos.
    """

    source: int
    target: int


def limits_for(config: PretrainedConfig, max_source_length: int, max_target_length: int) -> Limits:
    """Fit the configured lengths to the model: a causal prompt leaves room for the summary."""
    kind = model_kind(config)
    positions = max_positions(config)
    wanted = max_source_length + max_target_length if kind is ModelKind.ENCODER else max_source_length
    if positions is None:
        return Limits(wanted, max_target_length)
    if kind is ModelKind.DECODER:
        positions -= max_target_length
    if positions <= 0:
        raise ValueError(f"max_target_length ({max_target_length}) leaves no room for a document")
    return Limits(min(wanted, positions), max_target_length)


def new_token_room(config: PretrainedConfig, limits: Limits) -> int | None:
    """Most tokens a generation may add after the longest prompt ``limits`` lets through, by the
    model's position tables: causal, what the positions leave after ``limits.source``; seq2seq, the
    decoder's positions less its start token; None where positions are relative (T5)."""
    if model_kind(config) is ModelKind.DECODER:
        positions = max_positions(config)
        return None if positions is None else max(1, positions - limits.source)
    for name in ("max_decoder_position_embeddings", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value - 1
    return None


_warned_limits: set[int] = set()


def _warn_truncated(count: int, total: int, limit: int) -> None:
    """A warning the first time documents are cut to ``limit``; later batches log at debug level.

    Training on long documents cuts nearly every batch: one warning per batch would bury the
    progress lines, and the first one already tells the user what is happening.
    """
    if not count:
        return
    level = logging.DEBUG if limit in _warned_limits else logging.WARNING
    _warned_limits.add(limit)
    logger.log(level, "truncated %d of %d documents to fit %d tokens", count, total, limit)


def _text_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; verbose=False hides the per-text 'too long' warning."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def pad_rows(rows: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Pad ragged rows to one (B, T) tensor on the given side."""
    width = max(len(row) for row in rows)
    padded = [
        row + [value] * (width - len(row)) if side == "right" else [value] * (width - len(row)) + row
        for row in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


_PREFIXES: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, list[int]] = weakref.WeakKeyDictionary()


def _causal_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer itself puts before a text: Llama's bos; none for GPT-2, Qwen
    or SmolLM2, whose bos (``<|im_start|>``) opens a chat turn and was never trained before prose.
    Found once per tokenizer (two tokenizer calls), not at every batch."""
    if tokenizer not in _PREFIXES:
        plain = _text_ids(tokenizer, ["a"])[0]
        full = tokenizer(["a"], verbose=False)["input_ids"][0]
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        _PREFIXES[tokenizer] = list(full[: starts[0]]) if starts else []
    return _PREFIXES[tokenizer]


def document_room(tokenizer: PreTrainedTokenizerBase, limit: int, causal: bool) -> int:
    """Document tokens that fit in a source of ``limit`` tokens, after special tokens (seq2seq)
    or bos + separator (causal prompt)."""
    if causal:
        overhead = len(_causal_prefix(tokenizer)) + len(_text_ids(tokenizer, [CAUSAL_SEPARATOR])[0])
    else:
        overhead = tokenizer.num_special_tokens_to_add(pair=False)
    return limit - overhead


def truncated_documents(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], limit: int, causal: bool
) -> list[bool]:
    """Which documents the encoders below cut to fit ``limit`` (what the API reports back)."""
    room = document_room(tokenizer, limit, causal)
    return [len(ids) > room for ids in _text_ids(tokenizer, documents)]


def led_attention_window(config: PretrainedConfig) -> int | None:
    """LED's attention window (the largest over its layers); None for every other model."""
    if config.model_type != "led":
        return None
    window = config.attention_window
    return window if isinstance(window, int) else max(window)


def encode_sources(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], limit: int, led_window: int | None = None
) -> BatchEncoding:
    """Encoder inputs for a seq2seq model, right-padded; LED also gets its global attention mask.

    LED's sliding-window attention needs at least one globally attending token; the first one is
    the convention from the LED paper for summarization. LED inputs are padded to a multiple of
    ``led_window`` here: LED's own padding runs its embedding a second time, only for batches that
    need it, and under ZeRO-3 that extra call is an extra all-gather on some ranks only, which
    stalls every rank (the same forward on every rank is what ZeRO-3 requires).
    """
    cut = sum(truncated_documents(tokenizer, documents, limit, causal=False))
    _warn_truncated(cut, len(documents), limit)
    batch = tokenizer(
        documents, truncation=True, max_length=limit, padding=True, pad_to_multiple_of=led_window,
        return_tensors="pt",
    )
    if led_window is not None:
        global_mask = torch.zeros_like(batch["input_ids"])  # (B, S)
        global_mask[:, 0] = 1
        batch["global_attention_mask"] = global_mask
    return batch


def encode_seq2seq_pairs(
    tokenizer: PreTrainedTokenizerBase,
    documents: list[str],
    summaries: list[str],
    limits: Limits,
    led_window: int | None = None,
) -> dict[str, torch.Tensor]:
    """Encoder inputs plus ``labels`` (B, L), -100 on padding, and ``decoder_attention_mask``.

    The model builds its decoder inputs by shifting labels right, so the labels' mask is also the
    decoder's mask.
    """
    batch = dict(encode_sources(tokenizer, documents, limits.source, led_window))
    targets = tokenizer(
        text_target=summaries, truncation=True, max_length=limits.target, padding=True,
        return_tensors="pt",
    )
    mask = targets["attention_mask"]  # (B, L)
    batch["labels"] = targets["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    batch["decoder_attention_mask"] = mask
    return batch


def _prompt_rows(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], limit: int
) -> list[list[int]]:
    """The tokenizer's own prefix (Llama's bos) + document cut to fit + separator."""
    prefix = _causal_prefix(tokenizer)
    separator = _text_ids(tokenizer, [CAUSAL_SEPARATOR])[0]
    room = document_room(tokenizer, limit, causal=True)
    if room <= 0:
        raise ValueError(f"source limit {limit} leaves no room for a document after the separator")
    doc_ids = _text_ids(tokenizer, documents)
    _warn_truncated(sum(len(ids) > room for ids in doc_ids), len(documents), limit)
    return [prefix + ids[:room] + separator for ids in doc_ids]


def encode_causal_prompts(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], limit: int
) -> BatchEncoding:
    """Prompts for generation, LEFT-padded so every row's next token goes at the same position.

    Generation appends new tokens after the last column; with right padding short prompts would
    continue after pad tokens. Models read positions from the attention mask in ``generate``.
    """
    rows = _prompt_rows(tokenizer, documents, limit)
    input_ids = pad_rows(rows, tokenizer.pad_token_id, side="left")  # (B, P)
    attention_mask = pad_rows([[1] * len(row) for row in rows], 0, side="left")  # (B, P)
    return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})


def encode_causal_pairs(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], summaries: list[str], limits: Limits
) -> dict[str, torch.Tensor]:
    """prompt + summary + eos, right-padded; labels are the summary and eos, -100 elsewhere."""
    prompts = _prompt_rows(tokenizer, documents, limits.source)
    answers = [ids[: limits.target - 1] + [tokenizer.eos_token_id] for ids in _text_ids(tokenizer, summaries)]
    rows = [prompt + answer for prompt, answer in zip(prompts, answers)]
    labels = [[IGNORE_INDEX] * len(prompt) + answer for prompt, answer in zip(prompts, answers)]
    return {
        "input_ids": pad_rows(rows, tokenizer.pad_token_id),  # (B, T)
        "attention_mask": pad_rows([[1] * len(row) for row in rows], 0),  # (B, T)
        "labels": pad_rows(labels, IGNORE_INDEX),  # (B, T)
    }


def encode_text_pairs(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], summaries: list[str], limits: Limits
) -> BatchEncoding:
    """Encoder-only pair "[CLS] summary [SEP] document [SEP]", right-padded.

    The summary goes first so that cutting the document (``only_second``) can never reach it. A
    summary longer than its own limit is cut by decoding its first tokens (the tokenizers backend
    cannot join special tokens around raw ids), which is exact for WordPiece up to spacing.
    """
    summary_ids = _text_ids(tokenizer, summaries)
    summaries = [
        # cast: one sequence of ids decodes to one string (decode is typed for batches too)
        cast(str, tokenizer.decode(ids[: limits.target])) if len(ids) > limits.target else text
        for ids, text in zip(summary_ids, summaries)
    ]
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    cut = sum(
        len(doc) > limits.source - specials - min(len(summ), limits.target)
        for doc, summ in zip(_text_ids(tokenizer, documents), summary_ids)
    )
    _warn_truncated(cut, len(documents), limits.source)
    return tokenizer(
        summaries, documents, truncation="only_second", max_length=limits.source, padding=True,
        return_tensors="pt",
    )


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs from labels (B, L): start token, then labels[:-1], -100 replaced by pad."""
    shifted = labels.new_full(labels.shape, pad_id)  # (B, L)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)

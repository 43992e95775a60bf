"""Scalar heads over a backbone: the reward model (one score per pair) and the value model
(one value per token). Both are the same class pattern; only pooling and saved metadata differ.

Saved layout (a folder): the backbone in Hugging Face layout (config + safetensors), the
tokenizer, ``scalar_head.safetensors`` (the head's weight (n, H) and bias (n,)) and
``scalar_head.json`` (kind, role, and for the reward model its head layout and normalisation
constants). A disentangled reward model (ODIN, Chen et al. 2024) has n = 2 rows: quality, length.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config.core import ConfigError
from rlhf.config.sections import LoraConfig, ModelConfig, RewardHeads, RewardScore
from rlhf.models.dropout import checkpoint_config, disable_dropout_modules
from rlhf.models.encoding import (
    ModelKind,
    encode_causal_pairs,
    encode_seq2seq_pairs,
    encode_text_pairs,
    led_attention_window,
    limits_for,
    model_kind,
    shift_right,
)
from rlhf.models.lora import AdaptedModel, add_backbone_adapter, base_of, merged_state
from rlhf.models.offline import resolve_name_or_path
from rlhf.models.policy import enable_activation_checkpointing
from rlhf.models.tiny import build_tiny_backbone, is_tiny_preset
from rlhf.models.tokenizer import load_tokenizer
from rlhf.runtime import import_deepspeed

HEAD_WEIGHTS = "scalar_head.safetensors"
HEAD_META = "scalar_head.json"


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that start at 0 on each row's first real token.

    A causal backbone called outside ``generate`` numbers columns, not tokens, so a left-padded
    row (PPO rollouts) would otherwise see shifted positions and give different values.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of each row's last real token; right or left padding both work."""
    return mask.shape[1] - 1 - mask.long().flip(1).argmax(1)


def _partitioned(module: nn.Module) -> bool:
    """Whether ZeRO-3 partitioned ``module``'s weights at init (DeepSpeed marks them ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def _writable(head: nn.Module) -> Iterator[None]:
    """Full head weights to write in place; under ZeRO-3 rank 0's values reach every shard."""
    if not _partitioned(head):
        yield
        return
    with import_deepspeed().zero.GatheredParameters(list(head.parameters()), modifier_rank=0):
        yield


def _new_head(backbone: PreTrainedModel, seed: int, outputs: int = 1) -> nn.Linear:
    """(H -> outputs) in the backbone's dtype, and partitioned at init like it under ZeRO-3: DeepSpeed
    casts only unpartitioned models, so an fp32 head beside a bf16 ZeRO-3 backbone fails in
    ``deepspeed.initialize`` (one flat buffer per dtype)."""
    hidden = backbone.config.hidden_size
    dtype = next(backbone.parameters()).dtype
    init: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if _partitioned(backbone):
        from transformers.integrations.deepspeed import deepspeed_config

        # The config's precision, never Init(dtype=...): deepspeed 0.19 maps that to bf16 on a CPU.
        config = deepspeed_config() or {"train_micro_batch_size_per_gpu": 1,
                                        "bf16": {"enabled": dtype == torch.bfloat16}}
        init = import_deepspeed().zero.Init(config_dict_or_path=config)
    with init:
        head = nn.Linear(hidden, outputs, dtype=dtype)
    # Small random init (std 1/sqrt(H+1), as in Ziegler et al. 2019): a zero head would make
    # every fresh score equal and hide wiring mistakes; the seed keeps it reproducible.
    generator = torch.Generator().manual_seed(seed)
    with _writable(head), torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1), generator=generator)
        head.bias.zero_()
    return head


class ScalarHeadModel(nn.Module):
    """``backbone`` -> hidden states (B, T, H) -> ``head`` -> one scalar per token (B, T), or
    ``outputs`` scalars per token (B, T, outputs) when the head has several rows.

    For an encoder-decoder backbone the tokens are the decoder's: the document is read by the
    encoder and the summary by the decoder, so values line up with summary tokens as in PPO.
    """

    role: ClassVar[str] = "scalar"

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_source_length: int,
        max_target_length: int,
        seed: int = 0,
        outputs: int = 1,
    ) -> None:
        super().__init__()
        self.backbone: PreTrainedModel | AdaptedModel = backbone  # adapted by load(lora=...)
        self.tokenizer = tokenizer
        self.kind = model_kind(backbone.config)
        self.limits = limits_for(backbone.config, max_source_length, max_target_length)
        self.head = _new_head(backbone, seed, outputs)

    def token_values(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Per-token values (B, T) (or (B, T, n)) for the inputs of ``encode_pairs`` (labels are ignored).

        Not ``forward``: each subclass's ``forward`` says what it returns (a reward model takes a
        ``score`` kind too), and they share this.
        """
        inputs.pop("labels", None)
        if self.kind is ModelKind.DECODER and "position_ids" not in inputs:
            inputs["position_ids"] = positions_from_mask(inputs["attention_mask"])
        hidden = self.backbone(**inputs).last_hidden_state  # (B, T, H)
        values = self.head(hidden.to(self.head.weight.dtype))  # (B, T, n)
        return values.squeeze(-1) if values.shape[-1] == 1 else values  # (B, T) or (B, T, n)

    def encode_pairs(self, documents: list[str], summaries: list[str]) -> dict[str, torch.Tensor]:
        """Inputs for ``forward``; only documents are cut to fit (see rlhf.models.encoding).

        Encoder: "[CLS] summary [SEP] document [SEP]". Decoder: document + separator + summary +
        eos, right-padded. Encoder-decoder: document -> encoder; start + summary -> decoder, so
        the last decoder position has read the whole summary.
        """
        if self.kind is ModelKind.ENCODER:
            return dict(encode_text_pairs(self.tokenizer, documents, summaries, self.limits))
        if self.kind is ModelKind.DECODER:
            batch = encode_causal_pairs(self.tokenizer, documents, summaries, self.limits)
            del batch["labels"]
            return batch
        window = led_attention_window(self.backbone.config)
        batch = encode_seq2seq_pairs(self.tokenizer, documents, summaries, self.limits, window)
        config = self.backbone.config
        start = config.decoder_start_token_id
        batch["decoder_input_ids"] = shift_right(batch.pop("labels"), start, config.pad_token_id)
        return batch

    def metadata(self) -> dict[str, Any]:
        """What ``scalar_head.json`` records besides the weights."""
        return {"kind": self.kind.value, "role": self.role}

    @classmethod
    def _kwargs_from_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def _head_state(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Saved head weights as this class's head takes them (see ValueModel)."""
        return state

    def save(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Backbone (HF layout, safetensors) + tokenizer + head weights + head metadata;
        ``state_dict`` replaces this module's own tensors (a ZeRO-3 learner's gathered copies)."""
        folder = Path(path)
        tensors = self.state_dict() if state_dict is None else state_dict
        parts: dict[str, dict[str, torch.Tensor]] = {"backbone": {}, "head": {}}
        for name, tensor in tensors.items():
            part, _, rest = name.partition(".")
            parts[part][rest] = tensor
        backbone = self.backbone
        if isinstance(backbone, AdaptedModel):  # saved merged: the folder loads without peft
            parts["backbone"] = merged_state(backbone, parts["backbone"])
            backbone = base_of(backbone)
        backbone.save_pretrained(str(folder), state_dict=parts["backbone"])
        self.tokenizer.save_pretrained(str(folder))
        head = {name: tensor.detach().contiguous().cpu() for name, tensor in parts["head"].items()}
        save_file(head, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_META).write_text(json.dumps(self.metadata(), indent=2) + "\n")

    @classmethod
    def load(
        cls, cfg: ModelConfig, dtype: torch.dtype | None = None, dropout: bool = True,
        lora: LoraConfig | None = None, **fresh: Any
    ) -> ScalarHeadModel:
        """From a preset's backbone, a plain HF folder / hub name (fresh head), or our folder.

        ``dropout`` False (PPO roles) zeroes the backbone's dropout, see ``rlhf.models.dropout``.
        ``lora`` with ``r > 0`` puts fresh adapters on the backbone (frozen); the head trains whole.
        ``fresh``: constructor arguments for a new head; a saved folder's metadata overrides them.
        """
        name = resolve_name_or_path(cfg.name_or_path)
        saved = not is_tiny_preset(name) and (Path(name) / HEAD_META).is_file()
        metadata = json.loads((Path(name) / HEAD_META).read_text()) if saved else {}
        backbone = _load_backbone(name, dtype, dropout)
        model = cls(
            backbone, load_tokenizer(name), cfg.max_source_length,
            cfg.max_target_length, **{**fresh, **cls._kwargs_from_metadata(metadata)},
        )
        if saved:
            _check_kind(metadata, model.kind, name)
            with _writable(model.head):
                model.head.load_state_dict(cls._head_state(load_file(str(Path(name) / HEAD_WEIGHTS))))
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(backbone)
        if lora is not None and lora.r > 0:
            if cfg.gradient_checkpointing:
                backbone.enable_input_require_grads()  # frozen embeddings, recomputed blocks
            model.backbone = add_backbone_adapter(backbone, lora)
        return model.eval()


def _load_backbone(name: str, dtype: torch.dtype | None, dropout: bool = True) -> PreTrainedModel:
    """The base model without any LM head; safetensors only, so loading never unpickles.

    AutoModel on an LM checkpoint (GPT2LMHeadModel, T5ForConditionalGeneration) keeps the base
    weights and drops the LM head, so an SFT policy folder can start a reward or value model.
    """
    if is_tiny_preset(name):
        backbone = build_tiny_backbone(name, dropout=dropout)
        backbone = backbone if dtype is None else backbone.to(dtype)
    else:
        config, _ = checkpoint_config(name, dropout)
        backbone = AutoModel.from_pretrained(name, config=config, dtype=dtype, use_safetensors=True)
    return backbone if dropout else disable_dropout_modules(backbone)


def _check_kind(metadata: dict[str, Any], kind: ModelKind, name: str) -> None:
    if metadata.get("kind", kind.value) != kind.value:
        raise ValueError(f"{name}: {HEAD_META} says kind {metadata['kind']!r}, backbone is {kind.value!r}")


@dataclass
class ScoreStats:
    """Mean and std of one kind of raw score on reference data, for ``RewardModel.normalize``."""

    mean: float = 0.0
    std: float = 1.0


# The head row of each score; total is their sum. A single head's one row is quality and total.
_HEAD_ROWS: dict[RewardScore, int] = {"quality": 0, "length": 1}
# Metadata key prefix of each score's statistics; the total keeps "reward", its name before two heads.
_STATS_PREFIX: dict[RewardScore, str] = {"total": "reward", "quality": "quality", "length": "length"}


def head_count(heads: RewardHeads) -> int:
    """Rows of the head: 1 for a single score, 2 (quality, length) when disentangled."""
    return 2 if heads == "disentangled" else 1


class RewardModel(ScalarHeadModel):
    """One score per (document, summary) pair; higher means humans would prefer it.

    With ``heads="disentangled"`` the head has two rows on the same pooled feature: a quality
    score and a length score, trained so their sum (``total``) fits the preferences and only the
    length row tracks summary length (``rlhf.train.disentangle``). RL optimises ``quality``.
    ``stats`` holds each score kind's raw mean/std on the training data, saved with the model so
    PPO normalises whichever score it uses with the numbers that score was calibrated on.
    """

    role: ClassVar[str] = "reward"

    def __init__(
        self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_source_length: int,
        max_target_length: int, seed: int = 0, heads: RewardHeads = "single",
        stats: dict[RewardScore, ScoreStats] | None = None,
    ) -> None:
        """``ScalarHeadModel``'s arguments plus the head layout (which sets ``outputs``) and the
        stored score statistics."""
        super().__init__(backbone, tokenizer, max_source_length, max_target_length, seed, head_count(heads))
        self.heads: RewardHeads = heads
        self.stats: dict[RewardScore, ScoreStats] = {kind: ScoreStats() for kind in self.score_kinds()}
        self.stats.update(stats or {})

    def score_kinds(self) -> tuple[RewardScore, ...]:
        """The scores this model has statistics for: total, and per head when there are two."""
        return ("total", "quality", "length") if self.heads == "disentangled" else ("total",)

    def select(self, per_head: torch.Tensor, score: RewardScore) -> torch.Tensor:
        """(B,) scores of kind ``score`` from per-head scores (B, n).

        A single-head model's one score is both its total and its quality (so ``reward.head =
        quality`` works for any model); only a disentangled model has a length score.
        """
        if score == "total":
            return per_head.sum(-1)
        if _HEAD_ROWS[score] >= per_head.shape[-1]:
            raise ValueError(f"a {self.heads}-head reward model has no {score} score")
        return per_head[:, _HEAD_ROWS[score]]

    def forward(self, score: RewardScore | None = "total", **inputs: torch.Tensor) -> torch.Tensor:
        """Raw scores (B,) of kind ``score``, or every head's (B, n) for ``score=None``: the [CLS]
        value for encoders, else the value at the last real token."""
        if self.kind is ModelKind.ENCODER_DECODER:
            mask = inputs["decoder_attention_mask"]  # (B, L)
        else:
            mask = inputs["attention_mask"]  # (B, T)
        values = self.token_values(**inputs)  # (B, T) or (B, T, n)
        values = values if values.dim() == 3 else values.unsqueeze(-1)  # (B, T, n)
        if self.kind is ModelKind.ENCODER:
            per_head = values[:, 0]  # (B, n)
        else:
            index = last_token_index(mask)[:, None, None].expand(-1, 1, values.shape[-1])
            per_head = values.gather(1, index).squeeze(1)  # (B, n)
        return per_head if score is None else self.select(per_head, score)

    @torch.no_grad()
    def score(
        self, documents: list[str], summaries: list[str], score: RewardScore | None = "total"
    ) -> torch.Tensor:
        """Raw scores (B,) of kind ``score`` for text pairs, on the CPU (every head's (B, n) for
        None); see ``normalize``."""
        device = next(self.parameters()).device
        batch = {k: v.to(device) for k, v in self.encode_pairs(documents, summaries).items()}
        return self(score=score, **batch).float().cpu()

    def normalize(self, scores: torch.Tensor, score: RewardScore = "total") -> torch.Tensor:
        """(scores - mean) / std with the statistics of that score kind, same shape."""
        stats = self.stats["total" if self.heads == "single" else score]
        return (scores - stats.mean) / stats.std

    def metadata(self) -> dict[str, Any]:
        """``reward_mean``/``reward_std`` are the total's (as in folders from before two heads);
        a disentangled model adds ``quality_mean``, ``quality_std``, ``length_mean``, ``length_std``."""
        stats = {f"{_STATS_PREFIX[kind]}_{name}": getattr(self.stats[kind], name)
                 for kind in self.score_kinds() for name in ("mean", "std")}
        return {**super().metadata(), "heads": self.heads, **stats}

    @classmethod
    def _kwargs_from_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        if not metadata:
            return {}
        stats = {kind: ScoreStats(metadata[f"{prefix}_mean"], metadata[f"{prefix}_std"])
                 for kind, prefix in _STATS_PREFIX.items() if f"{prefix}_mean" in metadata}
        return {"heads": metadata.get("heads", "single"), "stats": stats}


class ValueModel(ScalarHeadModel):
    """Per-token values (B, T) for PPO's critic.

    It may be loaded from a saved reward model folder (a common critic initialisation): the head
    weights are reused and the reward statistics ignored.
    """

    role: ClassVar[str] = "value"

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Values (B, T) at every token of the inputs of ``encode_pairs``."""
        return self.token_values(**inputs)

    @classmethod
    def _head_state(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A disentangled reward head's rows summed: the critic starts from the total score."""
        return {name: tensor.sum(0, keepdim=True) for name, tensor in state.items()}


def saved_reward_heads(name_or_path: str) -> RewardHeads | None:
    """The head layout a reward folder we saved records (folders from before two heads:
    single), or None for a preset, a plain HF folder or a hub name."""
    name = resolve_name_or_path(name_or_path)
    meta = Path(name) / HEAD_META
    if is_tiny_preset(name) or not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("heads", "single")


def load_reward_model(
    cfg: ModelConfig, dtype: torch.dtype | None = None, dropout: bool = True,
    heads: RewardHeads | None = None, lora: LoraConfig | None = None,
) -> RewardModel:
    """Reward model from a preset, an HF folder / hub name (fresh head), or a folder we saved;
    ``dropout`` True keeps the checkpoint's (reward training), False for PPO scoring.

    ``heads`` (reward training's ``heads.layout``) is the layout of a fresh head and must match
    a saved folder's; None takes the folder's (single for a fresh head).
    """
    check_reward_heads(cfg.name_or_path, heads)
    model = RewardModel.load(cfg, dtype, dropout, lora, **({"heads": heads} if heads else {}))
    assert isinstance(model, RewardModel)
    return model


def check_reward_heads(name_or_path: str, heads: RewardHeads | None) -> None:
    """ConfigError when a saved reward model's layout is not the requested ``heads``."""
    saved = saved_reward_heads(name_or_path)
    if heads is not None and saved is not None and saved != heads:
        raise ConfigError("heads.layout", f"{name_or_path} is a {saved}-head reward model, not {heads}; "
                          f"set heads.layout={saved} or start from a backbone")


def load_value_model(
    cfg: ModelConfig, dtype: torch.dtype | None = None, dropout: bool = True, lora: LoraConfig | None = None
) -> ValueModel:
    """Value model from the same sources as ``load_reward_model``; PPO passes ``dropout=False``."""
    model = ValueModel.load(cfg, dtype, dropout, lora)
    assert isinstance(model, ValueModel)
    return model

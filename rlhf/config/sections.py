"""Config sections shared by several jobs. Each field's doc lives here and only here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.config.core import ConfigError, option

SourceFormat = Literal["auto", "jsonl", "json", "parquet", "csv", "hub"]


@dataclass
class DataSourceConfig:
    """Where a dataset comes from and how its columns map onto a canonical schema."""

    path: str = option(
        "", "Local file (.jsonl/.json/.parquet/.csv) or hub dataset name "
        "(e.g. openai/summarize_from_feedback, ccdv/arxiv-summarization).", must_exist=True
    )
    format: SourceFormat = option("auto", "File format; auto picks it from the suffix, hub for hub names.")
    hub_config: str = option(
        "", "Hub dataset config: comparisons or axis for summarize_from_feedback; "
        "section or document for arxiv-summarization."
    )
    split: str = option("train", "Split to read from a hub dataset; local files are read whole.")
    columns: dict[str, str] = option(
        factory=dict, help="Canonical column -> source column, e.g. {original_text: body, summary: tldr}."
    )
    strict: bool = option(False, "Raise on the first bad row instead of skipping and counting it.")
    limit: int | None = option(None, "Read at most this many valid rows (null = all).", gt=0)
    min_rating: int | None = option(
        None, "For axis data used as SFT pairs: keep summaries rated at least this overall (1-7).",
        ge=1, le=7,
    )


@dataclass
class ModelConfig:
    """A model by hub name, local Hugging Face folder, or tiny offline preset."""

    name_or_path: str = option(
        "tiny-t5", "Hub name, local folder, or an offline preset: tiny-t5, tiny-bart, tiny-led, "
        "tiny-gpt2, tiny-llama.", must_exist=True
    )
    max_source_length: int = option(512, "Max document tokens; longer documents are truncated.", gt=0)
    max_target_length: int = option(64, "Max summary tokens.", gt=0)
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")


@dataclass
class StoreConfig:
    """The feedback database."""

    url: str = option(
        "sqlite:///feedback.db", "SQLAlchemy URL of the feedback database "
        "(sqlite:///file.db, postgresql+psycopg://user@host/db). Secrets go in env vars, "
        "e.g. postgresql+psycopg://user:${PGPASSWORD}@host/db is expanded at connect time."
    )

    def validate(self) -> None:
        if "://" not in self.url:
            raise ConfigError("url", f"not an SQLAlchemy URL: {self.url!r} (e.g. sqlite:///feedback.db)")


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed settings shared by SFT and reward-model training."""

    num_workers: int = option(1, "Ray Train workers (data-parallel ranks).", gt=0)
    use_gpu: bool = option(False, "One GPU per worker (bf16); false trains on CPU in fp32.")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker.", gt=0)
    zero_stage: int = option(0, "DeepSpeed ZeRO stage: 0 (plain DDP) to 3 (shard params too).",
                             choices=(0, 1, 2, 3))
    offload_optimizer: bool = option(False, "Keep optimizer state in CPU memory (ZeRO 1-3).")
    offload_params: bool = option(False, "Keep parameters in CPU memory (ZeRO-3 only).")
    batch_size: int = option(8, "Micro-batch size per worker.", gt=0)
    grad_accum_steps: int = option(1, "Micro-batches per optimizer step.", gt=0)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0 = off).", ge=0)
    lr: float = option(1e-3, "Peak learning rate.", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0)
    warmup_steps: int = option(0, "Linear warmup steps from 0 to lr.", ge=0)
    lr_schedule: str = option("linear", "Decay after warmup.", choices=("linear", "cosine", "constant"))
    max_steps: int = option(40, "Optimizer steps to train.", gt=0)
    eval_every: int = option(20, "Validate every N steps (and at the end).", gt=0)
    save_every: int = option(20, "Checkpoint every N steps (and at the end).", gt=0)
    log_every: int = option(5, "Print a progress line every N steps.", gt=0)
    validation_fraction: float = option(
        0.1, "Share of the training rows held out for validation when no eval_data is given.",
        gt=0, le=0.5,
    )
    max_eval_rows: int = option(64, "Validate on at most this many held-out rows.", gt=0)

    def validate(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params", "needs zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer", "needs zero_stage 1, 2 or 3")

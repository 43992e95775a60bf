"""Config sections shared by several packages' jobs. Each field's doc lives here and only here.

A job's own tree lives in its package (``rlhf/train/config.py``, ``rlhf/ppo/config.py``, ...) next to
the code that dispatches on its choices; this module depends on nothing but :mod:`rlhf.config.core`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from rlhf.config.core import ConfigError, option

SourceFormat = Literal["auto", "jsonl", "json", "parquet", "csv", "hub"]
ZeroStage = Literal[0, 1, 2, 3]
DType = Literal["auto", "bf16", "fp32"]  # roles.dtype, train.dtype; see rlhf.models.policy.resolve_dtype
# Reward-model heads (rlhf.models.heads): one score, or ODIN's quality + length heads on one backbone.
RewardHeads = Literal["single", "disentangled"]
# A reward model's scores: total = quality + length; a single-head model's one score serves as
# total and quality, and it has no length score (see rlhf.models.heads.RewardModel.select).
RewardScore = Literal["total", "quality", "length"]
LoraPublish = Literal["merged", "adapter"]  # lora.publish: what a LoRA run saves
RewardHead = Literal["quality", "total"]  # what RL optimises (reward.head) and eval judges
DocumentPart = Literal["rest", "holdout"]  # data.part: which side of a document-hash split to read
# Where a run's params and metrics go besides metrics.jsonl (rlhf.tracking builds one tracker each).
TrackingBackend = Literal["tensorboard", "wandb", "mlflow"]
WandbMode = Literal["offline", "online"]  # tracking.wandb_mode: offline writes a run folder to sync later
# Backends whose package is the optional `tracking` extra (tensorboardX is a core dependency).
TRACKING_EXTRA: dict[TrackingBackend, str] = {"wandb": "wandb", "mlflow": "mlflow"}


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
    holdout_share: float = option(
        0.0, "Set aside this share of documents by a hash of their text (0 = none): the same "
        "document falls on the same side in every file and run, so SFT, RL and eval data split alike.",
        ge=0, le=0.9,
    )
    part: DocumentPart = option("rest", "With holdout_share > 0: read the rest, or the held-out documents.")


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
class LoraConfig:
    """Low-rank adapters (PEFT LoRA) on the policy; the base weights stay frozen."""

    r: int = option(0, "Adapter rank; 0 = no adapters, every weight trains.", ge=0)
    alpha: float = option(16.0, "Adapter scale: its update is multiplied by alpha / r.", gt=0)
    dropout: float = option(0.05, "Dropout on the adapter's input while training.", ge=0, le=0.9)
    target_modules: list[str] = option(
        factory=list, help="Linear layers to adapt by name; empty = the family default (PEFT's table: "
        "q,v for T5, q_proj,v_proj for BART/Llama/Qwen, c_attn for GPT-2; query,value,q_proj,v_proj "
        "for LED)."
    )
    publish: LoraPublish = option(
        "merged", "What the run saves: merged (a full model that loads without peft) or adapter (the "
        "adapter folder, which names its base)."
    )


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
            raise ConfigError("url", f"not an SQLAlchemy URL: {self.url!r}; accepted forms: "
                                     "sqlite:///path/feedback.db or postgresql+psycopg://user@host:5432/db")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings of a learner: SFT and reward-model ranks, the PPO learner."""

    zero_stage: ZeroStage = option(0, "DeepSpeed ZeRO stage: 0 (plain data parallel) to 3 (shard "
                                      "parameters too).")
    offload_optimizer: bool = option(False, "Keep optimizer state in CPU memory (ZeRO 1-3).")
    offload_params: bool = option(False, "Keep parameters in CPU memory (ZeRO-3 only).")

    def validate(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params", f"needs zero_stage=3, got zero_stage={self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer", "needs zero_stage 1, 2 or 3, got zero_stage=0")


@dataclass
class TrackingConfig:
    """Experiment trackers a training job logs to: its config as parameters, every metrics.jsonl row
    (cycles.jsonl in the online loop) and the final model folder."""

    backends: list[TrackingBackend] = option(
        factory=lambda: ["tensorboard"], help="Any of tensorboard (output_dir/tensorboard), wandb, mlflow; "
        "wandb and mlflow need the tracking extra (pip install -e '.[tracking]')."
    )
    project: str = option("rlhf", "W&B project and MLflow experiment the run is filed under.")
    run_name: str = option("", "Name of the run in W&B and MLflow; empty = output_dir's folder name.")
    mlflow_uri: str = option(
        "", "MLflow tracking URI: empty = a local store, output_dir/mlflow.db (SQLite; files in "
        "output_dir/mlartifacts); or a server (http://host:5000) or another database (sqlite:///mlflow.db)."
    )
    wandb_mode: WandbMode = option(
        "offline", "offline: the run folder is written under output_dir/wandb (upload it later with "
        "`wandb sync`); online: streamed to W&B (needs WANDB_API_KEY or `wandb login`)."
    )

    def validate(self) -> None:
        for backend in self.backends:
            if self.backends.count(backend) > 1:
                raise ConfigError("backends", f"{backend} is listed twice")
            package = TRACKING_EXTRA.get(backend)
            if package is not None and importlib.util.find_spec(package) is None:
                raise ConfigError("backends",
                                  f"{backend} needs the tracking extra: pip install -e '.[tracking]'")

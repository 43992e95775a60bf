"""Supervised fine-tuning of the summarization policy (seq2seq or causal) on Ray Train."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from rlhf.cli import tracked_run
from rlhf.config.sections import LoraConfig, ModelConfig
from rlhf.data.schemas import Schema
from rlhf.eval.rouge import rouge
from rlhf.metrics import emit
from rlhf.models import Policy, load_policy
from rlhf.train.config import SFTConfig
from rlhf.train.data import train_and_validation
from rlhf.train.supervised_loop import LoopSettings, Rows, TrainResult, built, run_training
from rlhf.train.zero_gather import Gather, save_policy


def _chunks(rows: Rows, size: int) -> list[Rows]:
    n = len(next(iter(rows.values()))) if rows else 0
    return [{k: v[i : i + size] for k, v in rows.items()} for i in range(0, n, size)]


def _show(documents: list[str], summaries: list[str], count: int, width: int = 160) -> None:
    """The first ``count`` (document, summary) pairs, one short line each, to watch them change."""
    for i, (document, summary) in enumerate(zip(documents[:count], summaries[:count])):
        post = " ".join(document.split())
        shown = post[:width] + ("..." if len(post) > width else "")
        emit(f"  [{i}] {shown}\n      -> {' '.join(summary.split())}")


@dataclass
class SFTTask:
    """Token-level cross-entropy on the summary given the document (the model's own loss)."""

    model_cfg: ModelConfig
    batch_size: int
    rouge_rows: int
    zero_stage: int
    lora: LoraConfig = field(default_factory=LoraConfig)
    show_summaries: int = 0
    policy: Policy | None = field(default=None, repr=False)

    def build_model(self) -> nn.Module:
        self.policy = load_policy(self.model_cfg, lora=self.lora)
        return self.policy.model

    def prepare(self, model: nn.Module, table: pa.Table) -> pa.Table:
        """SFT reads the rows as they are."""
        return table

    def _batch(self, model: nn.Module, rows: Rows) -> dict[str, torch.Tensor]:
        batch = built(self.policy, self).encode_pairs(rows["original_text"], rows["summary"])
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        return model(**self._batch(model, rows)).loss, {}

    def evaluate(self, model: nn.Module, rows: Rows) -> dict[str, float]:
        losses = [model(**self._batch(model, chunk)).loss.item()
                  for chunk in _chunks(rows, self.batch_size)]
        metrics = {"val_loss": sum(losses) / len(losses)}
        if self.rouge_rows:
            sample = {k: v[: self.rouge_rows] for k, v in rows.items()}
            synced = self.zero_stage == 3 and dist.is_initialized() and dist.get_world_size() > 1
            predictions = built(self.policy, self).generate(sample["original_text"], do_sample=False,
                                               synced_gpus=synced)
            metrics.update(rouge(predictions, sample["summary"]))
            if not dist.is_initialized() or dist.get_rank() == 0:
                _show(sample["original_text"], predictions, self.show_summaries)
        return metrics

    def finalize(self, model: nn.Module) -> None:
        """Nothing to compute after SFT."""

    def save(self, model: nn.Module, path: Path, gather: Gather) -> None:
        save_policy(built(self.policy, self), path, self.lora.publish, gather)


def run_sft(cfg: SFTConfig, resume: bool = False) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``cfg.data``; the final model lands in ``output_dir/model``."""
    train, validation = train_and_validation(
        cfg.data, cfg.eval_data, Schema.SFT, cfg.train.validation_fraction, cfg.seed
    )
    emit(f"sft: {train.num_rows} training pairs, {validation.num_rows} validation pairs")
    task = SFTTask(cfg.model, cfg.train.batch_size, cfg.rouge_rows, cfg.train.deepspeed.zero_stage, cfg.lora,
                   cfg.show_summaries)
    settings = LoopSettings(cfg.train, cfg.seed, cfg.output_dir, tracked_run(cfg))
    return run_training(task, settings, train, validation, resume=resume)

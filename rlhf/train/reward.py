"""Reward-model training: Bradley-Terry loss on preference pairs, on Ray Train.

Human comparisons can be mixed with synthetic pairs (:mod:`rlhf.data.augment`). After training,
the raw scores' mean and std on the training data are stored with the model so that PPO can use
normalised rewards.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rlhf.config.sections import ModelConfig
from rlhf.data.augment import synthetic_preferences
from rlhf.data.schemas import Schema
from rlhf.data.sources import dataset_table, load_source
from rlhf.errors import InputError
from rlhf.metrics import emit
from rlhf.models import RewardModel, load_reward_model
from rlhf.store import check_url, feedback_dataset
from rlhf.train.config import RewardConfig, RewardTrainingConfig
from rlhf.train.data import split_validation, train_and_validation
from rlhf.train.loop import LoopSettings, Rows, TrainResult, run_training

MAX_STAT_BATCHES = 64  # training batches per rank scored for the reward mean/std


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise loss -log sigmoid(r_chosen - r_rejected), accuracy and mean margin.

    chosen, rejected: (B,) scores. ``logsigmoid`` keeps large negative margins finite.
    """
    margin = chosen - rejected  # (B,)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean(), margin.mean()


def chosen_and_rejected(rows: Rows) -> tuple[list[str], list[str], list[str]]:
    """(documents, chosen summaries, rejected summaries) from canonical preference rows."""
    chosen, rejected = [], []
    for s0, s1, choice in zip(rows["summary_0"], rows["summary_1"], rows["choice"]):
        chosen.append(s1 if choice else s0)
        rejected.append(s0 if choice else s1)
    return list(rows["original_text"]), chosen, rejected


@dataclass
class RewardTask:
    """Scores chosen and rejected summaries in one forward pass of 2B pairs."""

    model_cfg: ModelConfig
    batch_size: int
    seed: int
    reward_model: RewardModel | None = field(default=None, repr=False)
    # The latest training rows seen, scored at the end for the reward mean/std.
    seen: deque[Rows] = field(default_factory=lambda: deque(maxlen=MAX_STAT_BATCHES), repr=False)

    def build_model(self) -> nn.Module:
        self.reward_model = load_reward_model(self.model_cfg)
        return self.reward_model

    def _scores(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        documents, chosen, rejected = chosen_and_rejected(rows)
        batch = self.reward_model.encode_pairs(documents + documents, chosen + rejected)
        device = next(model.parameters()).device
        scores = model(**{k: v.to(device) for k, v in batch.items()}).float()  # (2B,)
        return scores[: len(documents)], scores[len(documents):]

    def loss(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        self.seen.append(rows)
        loss, accuracy, margin = bradley_terry_loss(*self._scores(model, rows))
        return loss, {"accuracy": accuracy.item(), "margin": margin.item()}

    def evaluate(self, model: nn.Module, rows: Rows) -> dict[str, float]:
        n = len(rows["choice"])
        totals = {"val_loss": 0.0, "val_accuracy": 0.0, "val_margin": 0.0}
        for start in range(0, n, self.batch_size):
            chunk = {k: v[start : start + self.batch_size] for k, v in rows.items()}
            values = bradley_terry_loss(*self._scores(model, chunk))
            for key, value in zip(totals, values):
                totals[key] += value.item() * len(chunk["choice"])
        return {k: v / n for k, v in totals.items()}

    def finalize(self, model: nn.Module) -> None:
        """Mean and std of raw scores of the latest training summaries, over all ranks."""
        stats = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares
        for rows in self.seen:
            chosen, rejected = self._scores(model, rows)
            scores = torch.cat([chosen, rejected]).double()
            stats += torch.stack([torch.tensor(float(len(scores))), scores.sum(), (scores**2).sum()])
        if dist.is_initialized():
            dist.all_reduce(stats)
        count, total, squares = stats.tolist()
        mean = total / count
        self.reward_model.reward_mean = mean
        self.reward_model.reward_std = math.sqrt(max(squares / count - mean**2, 1e-12))

    def save(self, model: nn.Module, path: Path) -> None:
        self.reward_model.save(path)


def _human_comparisons(cfg: RewardConfig) -> tuple[pa.Table | None, pa.Table | None]:
    """(train, validation) human comparisons from files and the feedback database, or Nones."""
    tables, validation = [], None
    if cfg.data is not None:
        train, validation = train_and_validation(
            cfg.data, cfg.eval_data, Schema.PREFERENCE, cfg.train.validation_fraction, cfg.seed
        )
        tables.append(train)
    if cfg.from_store:
        feedback = dataset_table(feedback_dataset(cfg.store.url, Schema.PREFERENCE), Schema.PREFERENCE)
        emit(f"reward: {feedback.num_rows} comparisons from the feedback database")
        if validation is None and feedback.num_rows:
            feedback, validation = split_validation(feedback, cfg.train.validation_fraction, cfg.seed)
        tables.append(feedback)
    return (pa.concat_tables(tables) if tables else None), validation


def _synthetic(cfg: RewardConfig, n_human: int) -> pa.Table | None:
    """``augment.ratio`` synthetic pairs per human comparison (all augment rows without humans)."""
    if cfg.augment.data is None:
        return None
    sft = load_source(cfg.augment.data, Schema.SFT).table
    n_pairs = round(cfg.augment.ratio * n_human) if n_human else sft.num_rows
    synthetic = synthetic_preferences(sft, n_pairs, cfg.augment.kinds, cfg.seed)
    emit(f"reward: {synthetic.num_rows} synthetic pairs from {cfg.augment.data.path}")
    return synthetic


def reward_data(cfg: RewardConfig) -> tuple[pa.Table, pa.Table]:
    """(train, validation): validation is human-only whenever human data exists."""
    human, validation = _human_comparisons(cfg)
    synthetic = _synthetic(cfg, human.num_rows if human is not None else 0)
    if validation is None:
        if synthetic is None:
            raise InputError("data: no training rows; add comparisons or augment.data.path")
        synthetic, validation = split_validation(synthetic, cfg.train.validation_fraction, cfg.seed)
    train = pa.concat_tables([t for t in (human, synthetic) if t is not None])
    return train, validation


def train_reward_model(
    training: RewardTrainingConfig, train: pa.Table, validation: pa.Table, output_dir: str, seed: int,
    resume: bool = False,
) -> TrainResult:
    """Train ``training.model`` on comparisons; jobs/reward.py and each online cycle call it."""
    task = RewardTask(training.model, training.train.batch_size, seed)
    settings = LoopSettings(train=training.train, seed=seed, output_dir=output_dir)
    return run_training(task, settings, train, validation, resume=resume)


def run_reward(cfg: RewardConfig, resume: bool = False) -> TrainResult:
    """Train the reward model; ``output_dir/model`` holds it with its reward mean/std."""
    if cfg.from_store:
        check_url(cfg.store.url)  # fail in seconds, before Ray starts
    train, validation = reward_data(cfg)
    emit(f"reward: {train.num_rows} training pairs, {validation.num_rows} validation")
    return train_reward_model(cfg, train, validation, cfg.output_dir, cfg.seed, resume=resume)

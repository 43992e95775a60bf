"""Reward-model training: Bradley-Terry loss on preference pairs, on Ray Train.

Human comparisons can be mixed with synthetic pairs (:mod:`rlhf.data.augment`). After training,
the raw scores' mean and std on the training data (per score kind for two heads) are stored with
the model so that PPO can use normalised rewards. ``heads.layout = disentangled`` adds ODIN's
length terms (:mod:`rlhf.train.disentangle`); ``balance_longer`` reorders the training pairs.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rlhf.cli import tracked_run
from rlhf.config.sections import LoraConfig, ModelConfig
from rlhf.data.augment import synthetic_preferences
from rlhf.data.schemas import Schema
from rlhf.data.sources import load_source
from rlhf.errors import InputError
from rlhf.metrics import emit
from rlhf.models import RewardModel, load_reward_model
from rlhf.models.heads import ScoreStats, check_reward_heads
from rlhf.store import check_url
from rlhf.tracking import TrackedRun
from rlhf.train.config import RewardConfig, RewardHeadsConfig, RewardTrainingConfig
from rlhf.train.data import human_comparisons, split_validation
from rlhf.train.disentangle import length_correlation_loss, orthogonality_loss
from rlhf.train.supervised_loop import LoopSettings, Rows, TrainResult, built, run_training
from rlhf.train.zero_gather import Gather, save_gathered

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


def _lengths(chosen: list[str], rejected: list[str]) -> torch.Tensor:
    """Summary lengths (2B,) in characters, in the order ``RewardTask`` scores them: the unit the
    eval report's length baseline and correlations use, the same for every tokenizer."""
    return torch.tensor([float(len(s)) for s in chosen + rejected])


@dataclass
class RewardTask:
    """Scores chosen and rejected summaries in one forward pass of 2B pairs."""

    model_cfg: ModelConfig
    batch_size: int
    seed: int
    heads: RewardHeadsConfig = field(default_factory=RewardHeadsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward_model: RewardModel | None = field(default=None, repr=False)
    # The latest training rows seen, scored at the end for the reward mean/std.
    seen: deque[Rows] = field(default_factory=lambda: deque(maxlen=MAX_STAT_BATCHES), repr=False)

    def build_model(self) -> nn.Module:
        self.reward_model = load_reward_model(self.model_cfg, heads=self.heads.layout, lora=self.lora)
        return self.reward_model

    def prepare(self, model: nn.Module, table: pa.Table) -> pa.Table:
        """Reward training reads the rows as they are."""
        return table

    def _scores(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head raw scores (B, n) of the chosen and of the rejected summaries."""
        documents, chosen, rejected = chosen_and_rejected(rows)
        batch = built(self.reward_model, self).encode_pairs(documents + documents, chosen + rejected)
        device = next(model.parameters()).device
        scores = model(score=None, **{k: v.to(device) for k, v in batch.items()}).float()  # (2B, n)
        return scores[: len(documents)], scores[len(documents):]

    def loss(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        self.seen.append(rows)
        chosen, rejected = self._scores(model, rows)  # (B, n) each
        loss, accuracy, margin = bradley_terry_loss(chosen.sum(-1), rejected.sum(-1))
        metrics = {"accuracy": accuracy.item(), "margin": margin.item()}
        if self.heads.layout == "single":
            return loss, metrics
        extra, length_metrics = self._length_terms(rows, torch.cat([chosen, rejected]))
        return loss + extra, {**metrics, **length_metrics}

    def _length_terms(self, rows: Rows, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """ODIN's weighted length-correlation and orthogonality terms for scores (2B, 2)."""
        _, chosen, rejected = chosen_and_rejected(rows)
        length = length_correlation_loss(scores[:, 0], scores[:, 1], _lengths(chosen, rejected).to(scores))
        # (2, H); whole unless ZeRO-3 (config refuses)
        weight = built(self.reward_model, self).head.weight.float()
        orthogonality = orthogonality_loss(weight[0], weight[1])
        loss = (self.heads.length_correlation_weight * length.loss
                + self.heads.orthogonality_weight * orthogonality)
        return loss, {"rho_quality": length.rho_quality.item(), "rho_length": length.rho_length.item(),
                      "orthogonality": orthogonality.item()}

    def evaluate(self, model: nn.Module, rows: Rows) -> dict[str, float]:
        """Bradley-Terry loss, accuracy and margin of the total score (a single head's score)."""
        n = len(rows["choice"])
        totals = {"val_loss": 0.0, "val_accuracy": 0.0, "val_margin": 0.0}
        for start in range(0, n, self.batch_size):
            chunk = {k: v[start : start + self.batch_size] for k, v in rows.items()}
            chosen, rejected = self._scores(model, chunk)
            values = bradley_terry_loss(chosen.sum(-1), rejected.sum(-1))
            for key, value in zip(totals, values):
                totals[key] += value.item() * len(chunk["choice"])
        return {k: v / n for k, v in totals.items()}

    def finalize(self, model: nn.Module) -> None:
        """Mean and std of each score kind's raw scores of the latest training summaries, over all
        ranks: total (a single head's one score), and quality and length for two heads."""
        reward_model = built(self.reward_model, self)
        kinds = reward_model.score_kinds()
        stats = torch.zeros(len(kinds), 3, dtype=torch.float64)  # per kind: count, sum, sum of squares
        for rows in self.seen:
            per_head = torch.cat(self._scores(model, rows)).double()  # (2B, n)
            for i, kind in enumerate(kinds):
                scores = reward_model.select(per_head, kind)
                stats[i] += torch.stack([torch.tensor(float(len(scores))), scores.sum(), (scores**2).sum()])
        if dist.is_initialized():
            dist.all_reduce(stats)
        for kind, (count, total, squares) in zip(kinds, stats.tolist()):
            mean = total / count
            reward_model.stats[kind] = ScoreStats(mean, math.sqrt(max(squares / count - mean**2, 1e-12)))

    def save(self, model: nn.Module, path: Path, gather: Gather) -> None:
        save_gathered(model, lambda state: built(self.reward_model, self).save(path, state), gather)


def _synthetic(cfg: RewardConfig, n_human: int) -> pa.Table | None:
    """``augment.ratio`` synthetic pairs per human comparison (all augment rows without humans)."""
    if cfg.augment.data is None:
        return None
    sft = load_source(cfg.augment.data, Schema.SFT).table
    n_pairs = round(cfg.augment.ratio * n_human) if n_human else sft.num_rows
    synthetic = synthetic_preferences(sft, n_pairs, cfg.augment.kinds, cfg.seed)
    emit(f"reward: {synthetic.num_rows} synthetic pairs from {cfg.augment.data.path}")
    return synthetic


def _repeat_shuffled(group: list[int], size: int, rng: random.Random) -> list[int]:
    """``size`` items of ``group``: shuffled passes over all of it, the last one cut short."""
    out: list[int] = []
    while len(out) < size:
        out += rng.sample(group, len(group))
    return out[:size]


def balance_by_longer(table: pa.Table, batch_size: int, seed: int) -> pa.Table:
    """Rows reordered so that each run of ``batch_size`` rows holds as many pairs whose chosen
    summary is the longer one (in characters) as pairs where it is not (shorter or as long).

    Without it about two thirds of TL;DR pairs pick the longer summary, and a model can fit a
    batch by length alone. The smaller group is repeated (whole shuffled passes) up to the larger
    one's size, so no pair is dropped; an odd ``batch_size`` gives alternate batches the extra
    row. Everything is shuffled by ``seed``. The training loop's local shuffle then mixes
    neighbouring batches: they stay balanced on average and exactly over its buffer.
    """
    rng = random.Random(seed)
    _, chosen, rejected = chosen_and_rejected(table.select(["original_text", "summary_0", "summary_1",
                                                            "choice"]).to_pydict())
    longer = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if len(c) > len(r)]
    other = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if len(c) <= len(r)]
    if not longer or not other:
        return table  # one group only: nothing to balance against
    size = max(len(longer), len(other))
    longer, other = _repeat_shuffled(longer, size, rng), _repeat_shuffled(other, size, rng)
    order: list[int] = []
    block = 0
    while longer or other:
        n_longer = batch_size // 2 + (batch_size % 2) * (block % 2)
        rows = longer[:n_longer] + other[: batch_size - n_longer]
        del longer[:n_longer], other[: batch_size - n_longer]
        order += rng.sample(rows, len(rows))
        block += 1
    return table.take(order)


def reward_data(cfg: RewardConfig) -> tuple[pa.Table, pa.Table]:
    """(train, validation): validation is human-only whenever human data exists."""
    human, validation = human_comparisons(cfg, "reward")
    synthetic = _synthetic(cfg, human.num_rows if human is not None else 0)
    if validation is None:
        if synthetic is None:
            raise InputError("data: no training rows; add comparisons or augment.data.path")
        synthetic, validation = split_validation(synthetic, cfg.train.validation_fraction, cfg.seed)
    train = pa.concat_tables([t for t in (human, synthetic) if t is not None])
    return train, validation


def train_reward_model(
    training: RewardTrainingConfig, train: pa.Table, validation: pa.Table, output_dir: str, seed: int,
    resume: bool = False, tracked: TrackedRun | None = None,
) -> TrainResult:
    """Train ``training.model`` on comparisons; jobs/reward.py and each online cycle call it (a cycle's
    run logs to tensorboard only: ``tracked`` None)."""
    check_reward_heads(training.model.name_or_path, training.heads.layout)  # before Ray starts
    if training.balance_longer:
        train = balance_by_longer(train, training.train.batch_size, seed)
        emit(f"reward: {train.num_rows} training pairs after balancing by the longer side")
    task = RewardTask(training.model, training.train.batch_size, seed, training.heads, training.lora)
    settings = LoopSettings(training.train, seed, output_dir, tracked or TrackedRun())
    return run_training(task, settings, train, validation, resume=resume)


def run_reward(cfg: RewardConfig, resume: bool = False) -> TrainResult:
    """Train the reward model; ``output_dir/model`` holds it with its reward mean/std."""
    if cfg.from_store:
        check_url(cfg.store.url)  # fail in seconds, before Ray starts
    train, validation = reward_data(cfg)
    emit(f"reward: {train.num_rows} training pairs, {validation.num_rows} validation")
    return train_reward_model(cfg, train, validation, cfg.output_dir, cfg.seed, resume=resume,
                              tracked=tracked_run(cfg))

"""Training data for the supervised jobs: load canonical rows and hold out a validation split."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from rlhf.config.sections import DataSourceConfig, StoreConfig
from rlhf.data.schemas import Schema
from rlhf.data.sources import dataset_table, load_source
from rlhf.metrics import emit
from rlhf.store import feedback_dataset
from rlhf.train.config import TrainConfig


def split_validation(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """A seeded random (train, validation) split; at least one validation row."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    n_val = max(1, int(round(table.num_rows * fraction)))
    return table.take(np.sort(order[n_val:])), table.take(np.sort(order[:n_val]))


def train_and_validation(
    data: DataSourceConfig, eval_data: DataSourceConfig | None, schema: Schema,
    fraction: float, seed: int,
) -> tuple[pa.Table, pa.Table]:
    """Rows to train and validate on: ``eval_data`` when given, else a held-out share of ``data``."""
    train = load_source(data, schema).table
    if eval_data is not None:
        return train, load_source(eval_data, schema).table
    return split_validation(train, fraction, seed)


class ComparisonSources(Protocol):
    """The preference sources of a job that trains on comparisons (jobs/reward.py, jobs/dpo.py)."""

    seed: int
    data: DataSourceConfig | None
    eval_data: DataSourceConfig | None
    from_store: bool
    store: StoreConfig
    train: TrainConfig


def human_comparisons(cfg: ComparisonSources, job: str) -> tuple[pa.Table | None, pa.Table | None]:
    """(train, validation) human comparisons from files and the feedback database, or Nones;
    ``job`` names the progress line."""
    tables, validation = [], None
    if cfg.data is not None:
        train, validation = train_and_validation(
            cfg.data, cfg.eval_data, Schema.PREFERENCE, cfg.train.validation_fraction, cfg.seed
        )
        tables.append(train)
    if cfg.from_store:
        feedback = dataset_table(feedback_dataset(cfg.store.url, Schema.PREFERENCE), Schema.PREFERENCE)
        emit(f"{job}: {feedback.num_rows} comparisons from the feedback database")
        if validation is None and feedback.num_rows:
            feedback, validation = split_validation(feedback, cfg.train.validation_fraction, cfg.seed)
        tables.append(feedback)
    return (pa.concat_tables(tables) if tables else None), validation

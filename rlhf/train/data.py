"""Training data for the supervised jobs: load canonical rows and hold out a validation split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rlhf.config.sections import DataSourceConfig
from rlhf.data.schemas import Schema
from rlhf.data.sources import load_source


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

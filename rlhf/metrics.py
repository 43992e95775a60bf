"""Run metrics: one JSON object per line in metrics.jsonl, passed on to the run's experiment trackers
(:class:`Tracker`: TensorBoard, W&B, MLflow), progress lines, and
the typed record of a PPO iteration (:class:`IterationMetrics`): PPO writes it, the online loop,
``rlhf.eval`` plots and the benchmarks read its fields, so a renamed metric fails where it is read.

How rlhf/ talks to people, one rule: a progress line (what a user watches while a job or long step
runs: data counts, iterations, rows scored, "wrote ...", "published ...") goes through :func:`emit`,
never ``print`` (inside Ray Train workers the patched ``print`` shows each line twice) nor a raw
``sys.stdout.write``. Diagnostics and warnings (retries, fallbacks, skipped rows) go through
``logging``, with ``logger = logging.getLogger(__name__)`` in each module; a warning that callers
are meant to filter keeps its own category (``warnings.warn(..., DataWarning)``). ``print`` stays
only where a command's stdout *is* its result (``python -m rlhf.data inspect|pdf``, ``python -m
rlhf.eval plot``) and for the one-line input error on stderr that ends a command with exit 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """An experiment-tracking backend a run logs to besides metrics.jsonl: TensorBoard, W&B, MLflow
    (``rlhf.tracking`` builds them from a job's ``tracking`` section). Only the process that writes
    metrics.jsonl holds trackers: the driver, or rank 0 of a Ray Train run."""

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's resolved config, flat dotted keys (:func:`flatten`)."""

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        """The numbers of one metrics row, flat dotted keys, at ``step``."""

    def log_artifact(self, folder: Path) -> None:
        """A finished model folder, where the backend stores files."""

    def close(self) -> None:
        """Finish the run: flush what is buffered and end the backend's processes."""


class MetricsWriter:
    """Appends records to ``output_dir/metrics.jsonl`` (or ``file_name``) and hands each record's
    numbers to the run's trackers, at the record's ``step_key`` value."""

    def __init__(self, output_dir: str | Path, step_key: str, trackers: Sequence[Tracker] = (),
                 file_name: str = "metrics.jsonl"):
        self.path = Path(output_dir) / file_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_key = step_key
        self.trackers = list(trackers)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {key: float(value) for key, value in flatten(record).items()
                   if isinstance(value, (int, float)) and key != self.step_key}
        for tracker in self.trackers:
            tracker.log_metrics(numbers, record[self.step_key])

    def log_artifact(self, folder: Path) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(folder)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: trackers take flat keys (an empty mapping stays a value,
    so every config key is kept)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def progress_line(record: dict[str, Any], keys: list[str]) -> str:
    """``key value | key value`` for the keys present, numbers to 4 significant digits."""
    return " | ".join(
        f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}"
        for k in keys if k in record
    )


def emit(line: str) -> None:
    """Write a line straight to stdout (Ray Train's patched ``print`` shows lines twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class IterationMetrics:
    """A row of metrics.jsonl (one per iteration); the field names are its JSON keys."""

    iteration: int  # iterations finished, counting this one (1-based)
    reward_mean: float  # raw reward-model or reward.fn score, mean over the rollout
    reward_used_mean: float  # the score PPO optimised: normalised if reward.normalize, no-EOS penalty
    kl_mean: float  # KL(policy || reference) per summary, summed over its tokens (k1 estimate)
    kl_coef: float  # KL penalty coefficient this iteration used (before the controller's update)
    policy_loss: float  # clipped PPO policy loss, mean over minibatch updates
    value_loss: float  # clipped value loss, mean over minibatch updates; 0 without a value model
    entropy: float  # policy entropy per token (nats), mean over minibatch updates
    clip_fraction: float  # fraction of tokens whose probability ratio was clipped
    approx_kl: float  # KL(old policy || updated policy) per token, mean over minibatch updates
    explained_variance: float  # 1 - Var(returns - values) / Var(returns); nan if returns are constant
    # or without a value model (ppo.advantage other than gae): undefined, not "perfect" or "useless"
    response_length_mean: float  # summary length in tokens, EOS included
    eos_fraction: float  # fraction of summaries that ended with EOS
    generate_tokens_per_s: float  # sampled tokens per second of the generate role
    rollout_lag: int  # updates the sampling weights were behind the learner's (ppo.async_rollout: <= 1)
    sync_transfer_s: float  # seconds learner rank 0 spent gathering, checking and sending weights
    sync_bytes: int  # bytes sent to each rollout worker: the whole policy once, then trainable tensors
    time_s: float  # wall seconds of the whole iteration
    time_generate_s: float  # wall seconds per role, as the driver waited for it
    time_score_s: float
    time_reference_s: float
    time_learn_s: float  # old log-probs and values, advantages and the PPO epochs
    time_sync_s: float

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The JSON keys of a record, in order."""
        return tuple(f.name for f in fields(cls))

    def to_record(self) -> dict[str, Any]:
        """The metrics.jsonl / registry ``metrics.json`` form."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> IterationMetrics:
        """Read a record back; a missing or unknown key is a TypeError, not a silent default."""
        return cls(**record)

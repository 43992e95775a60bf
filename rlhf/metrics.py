"""Run metrics: one JSON object per line in metrics.jsonl, TensorBoard scalars, progress lines, and
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends records to ``output_dir/metrics.jsonl`` and mirrors numbers to TensorBoard."""

    def __init__(self, output_dir: str | Path, step_key: str, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_key = step_key
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record[self.step_key]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != self.step_key:
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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

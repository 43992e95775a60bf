"""Run metrics: one JSON object per line in metrics.jsonl, TensorBoard scalars, progress lines."""

from __future__ import annotations

import json
import sys
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

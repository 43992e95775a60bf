"""Training curves from a run's metrics.jsonl, as one PNG: people read curves, not logs."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.errors import InputError
from rlhf.metrics import IterationMetrics


def _field(name: str) -> str:
    """``name`` if it is an IterationMetrics field: renaming a metric breaks this module at import
    instead of leaving a panel silently empty."""
    if name not in IterationMetrics.keys():
        raise AttributeError(f"IterationMetrics has no field {name!r}")
    return name


# (IterationMetrics field, panel title); panels whose key no record has are left out, so a
# metrics.jsonl written before a metric existed still plots
PPO_PANELS = [
    (_field("reward_mean"), "reward (raw)"),
    (_field("kl_mean"), "KL to reference (per sequence)"),
    (_field("entropy"), "entropy (per token)"),
    (_field("response_length_mean"), "summary length (tokens)"),
    (_field("clip_fraction"), "clipped tokens (share)"),
]
ITERATION = _field("iteration")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no metrics.jsonl; give the output_dir of a PPO run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Reward, KL, entropy, length and clip fraction against iteration; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if ITERATION in r]
    panels = [(key, title) for key, title in PPO_PANELS if any(key in r for r in records)]
    if not panels:
        raise InputError(f"{run_dir}: metrics.jsonl has none of {', '.join(k for k, _ in PPO_PANELS)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = [(r[ITERATION], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

"""The online tests' setup: labelled choices of real posts and a small cycle's config."""

from __future__ import annotations

from pathlib import Path

from rlhf.config.core import load_config
from rlhf.config.sections import DataSourceConfig
from rlhf.data.schemas import Schema
from rlhf.data.sources import load_source
from rlhf.online.config import OnlineConfig
from rlhf.store import FeedbackStore
from support.paths import FIXTURES

DATA = FIXTURES / "tldr_sft_sample.jsonl"


def label_choices(store: FeedbackStore, n: int, offset: int = 0) -> list[str]:
    """``n`` decided comparisons of real posts: the reference summary against a copy padded with a
    repeated sentence; the simulated person prefers the shorter one."""
    rows = load_source(DataSourceConfig(path=str(DATA)), Schema.SFT).table.to_pylist()
    ids = []
    for k in range(offset, offset + n):
        row = rows[k % len(rows)]
        short, long = row["summary"], row["summary"] + " It was a long day and nothing else happened."
        pair = (short, long) if k % 2 else (long, short)
        document = store.add_document(f"{row['original_text']} [{k}]")
        comparison = store.create_comparison(document, *pair, "v0001", "v0001")
        store.record_choice(comparison, pair.index(short))
        ids.append(comparison)
    return ids


def online_config(tmp_path: Path, *overrides: str) -> OnlineConfig:
    """A cycle small enough for 2 cores; PPO's roles in one actor (tests/ppo covers actors per role)."""
    return load_config(OnlineConfig, None, [
        f"output_dir={tmp_path / 'online'}", f"store.url=sqlite:///{tmp_path}/feedback.db",
        f"registry={tmp_path / 'registry'}", "cycles=1", "feedback.min_new=16", "feedback.settle_s=0",
        "feedback.poll_interval_s=0.2", "feedback.max_wait_s=30", "feedback.holdout_fraction=0.25",
        "feedback.max_accuracy_drop=1.0", "reward.train.max_steps=4", "reward.train.batch_size=4",
        "reward.train.eval_every=4", "reward.train.save_every=4", "rl.ppo.iterations=1",
        "rl.ppo.rollout_batch_size=4", "rl.ppo.minibatch_size=4", "rl.ppo.epochs=1",
        "rl.ppo.max_new_tokens=8", "rl.roles.cpus_per_actor=0.5", "rl.roles.colocate=true", *overrides,
    ])

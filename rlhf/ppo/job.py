"""jobs/ppo.py: wire config, prompts from Ray Data, the Ray roles and the PPO loop together."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import ray

from rlhf.config.jobs import PPOConfig
from rlhf.data.schemas import Schema
from rlhf.data.sources import read_dataset
from rlhf.metrics import MetricsWriter, emit, progress_line
from rlhf.ppo.actors import RayRoles
from rlhf.ppo.trainer import PPOTrainer, PromptStream, latest_checkpoint
from rlhf.train.loop import quiet_ray_data

PROGRESS_KEYS = ["iteration", "reward_mean", "kl_mean", "entropy", "clip_fraction", "value_loss",
                 "response_length_mean", "generate_tokens_per_s", "time_s"]


def prompt_stream(cfg: PPOConfig) -> PromptStream:
    """Documents from Ray Data, reshuffled each epoch with a seed so resume replays the order.

    The dataset is materialized before the role actors take the cluster's CPUs, and each epoch
    shuffles locally on the driver: a Ray Data task started later could wait forever for a CPU
    that the placement group holds.
    """
    dataset = read_dataset(cfg.prompts, Schema.PROMPTS).materialize()

    def epoch_documents(epoch: int) -> Iterator[str]:
        batches = dataset.iter_batches(batch_size=256, batch_format="pyarrow",
                                       local_shuffle_buffer_size=4096, local_shuffle_seed=cfg.seed + epoch)
        for batch in batches:
            yield from batch.column("original_text").to_pylist()

    return PromptStream(epoch_documents)


def run_ppo(cfg: PPOConfig, resume: bool = False) -> list[dict]:
    """Run PPO as configured; returns the metrics of each iteration run."""
    resume_from = latest_checkpoint(cfg.output_dir) if resume else None
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {cfg.output_dir}; run without it")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    quiet_ray_data()
    prompts = prompt_stream(cfg)
    roles = RayRoles(cfg)
    metrics = MetricsWriter(cfg.output_dir, step_key="iteration")

    def log(record: dict) -> None:
        metrics.write(record)
        emit(f"ppo {record['iteration']}/{cfg.ppo.iterations} | " + progress_line(record, PROGRESS_KEYS[1:]))

    trainer = PPOTrainer(cfg, roles, prompts, log)
    if resume_from is not None:
        trainer.restore(Path(resume_from))
        emit(f"resumed from {resume_from} at iteration {trainer.iteration}")
    try:
        return trainer.run()
    finally:
        metrics.close()
        roles.shutdown()

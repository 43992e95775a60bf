"""jobs/ppo.py: wire config, prompts from Ray Data, the Ray roles and the PPO loop together."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rlhf.cli import tracked_run
from rlhf.data.schemas import Schema
from rlhf.data.sources import read_dataset
from rlhf.metrics import IterationMetrics, MetricsWriter, emit, progress_line
from rlhf.ppo.actors import start_roles
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.trainer import PPOTrainer, PromptStream, latest_ppo_checkpoint
from rlhf.runtime import derive_seed, init_ray, quiet_ray_data


def progress(m: IterationMetrics) -> str:
    """What people watch per iteration: reward and KL, the learning signals, length and speed."""
    shown = {"reward_mean": m.reward_mean, "kl_mean": m.kl_mean, "entropy": m.entropy,
             "clip_fraction": m.clip_fraction, "value_loss": m.value_loss,
             "response_length_mean": m.response_length_mean,
             "generate_tokens_per_s": m.generate_tokens_per_s, "time_s": m.time_s}
    return progress_line(shown, list(shown))


def prompt_stream(cfg: PPOConfig) -> PromptStream:
    """Documents from Ray Data, reshuffled each epoch with a seed so resume replays the order.

    The dataset is materialized before the role actors take the cluster's CPUs, and each epoch
    shuffles locally on the driver: a Ray Data task started later could wait forever for a CPU
    that the placement group holds.
    """
    dataset = read_dataset(cfg.prompts, Schema.PROMPTS).materialize()

    def epoch_documents(epoch: int) -> Iterator[str]:
        batches = dataset.iter_batches(batch_size=256, batch_format="pyarrow", local_shuffle_buffer_size=4096,
                                       local_shuffle_seed=derive_seed(cfg.seed, epoch))
        for batch in batches:
            yield from batch.column("original_text").to_pylist()

    return PromptStream(epoch_documents)


def run_ppo(cfg: PPOConfig, resume: bool = False) -> list[IterationMetrics]:
    """Run PPO as configured; returns the metrics of each iteration run."""
    resume_from = latest_ppo_checkpoint(cfg.output_dir) if resume else None
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {cfg.output_dir}; run without it")
    init_ray()
    quiet_ray_data()
    prompts = prompt_stream(cfg)
    trackers = tracked_run(cfg).open(cfg.output_dir)
    with MetricsWriter(cfg.output_dir, step_key="iteration", trackers=trackers) as metrics:

        def log(iteration: IterationMetrics) -> None:
            metrics.write(iteration.to_record())
            emit(f"ppo {iteration.iteration}/{cfg.ppo.iterations} | {progress(iteration)}")

        roles = start_roles(cfg)
        try:
            trainer = PPOTrainer(cfg, roles, prompts, log)
            if resume_from is not None:
                trainer.restore(Path(resume_from))
                emit(f"resumed from {resume_from} at iteration {trainer.iteration}")
            history = trainer.run()
        finally:
            roles.shutdown()
        final = trainer.registry.current()  # the last iteration always publishes
        if final is not None:
            metrics.log_artifact(final)
        return history

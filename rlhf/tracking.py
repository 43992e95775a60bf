"""Experiment trackers: one :class:`~rlhf.metrics.Tracker` per ``tracking.backends`` entry.

A run's :class:`~rlhf.metrics.MetricsWriter` hands every metrics.jsonl row (cycles.jsonl in the online
loop) to its trackers; :meth:`TrackedRun.open` builds them and logs the run's resolved config as
parameters first. Only the process that writes metrics.jsonl opens them: the driver of PPO and the
online loop, rank 0 of a Ray Train run (``rlhf.train.supervised_loop``), never every worker.

Both optional backends work offline: W&B with ``mode="offline"`` writes its run folder under
``output_dir/wandb`` (``wandb sync`` uploads it later); MLflow writes to a local SQLite store,
``output_dir/mlflow.db`` (files in ``output_dir/mlartifacts``), unless ``tracking.mlflow_uri`` names
a server. Their packages are the
``tracking`` extra; the config section checks they are installed before any work starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config.sections import TrackingBackend, TrackingConfig, WandbMode
from rlhf.metrics import Tracker

MLFLOW_BATCH = 100  # MLflow takes at most 100 params per log_batch call
MLFLOW_MAX_PARAM = 6000  # characters of a param value MLflow stores
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"  # the default store in output_dir


class TensorBoardTracker:
    """Scalars as TensorBoard events in ``output_dir/tensorboard``."""

    def __init__(self, output_dir: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log_params(self, params: dict[str, Any]) -> None:
        """Nothing: TensorBoard shows scalars, and output_dir/config.yaml beside it holds the config."""

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifact(self, folder: Path) -> None:
        """Nothing: the model folder already lies in output_dir beside the events."""

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run, through ``MlflowClient`` (no process-global active run, so a test or a job
    may hold several)."""

    def __init__(self, uri: str, experiment: str, run_name: str, artifacts: str | None = None):
        """``artifacts``: where a new experiment keeps files (None: where the server says)."""
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found
                         else self.client.create_experiment(experiment, artifact_location=artifacts))
        self.run_id: str = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:MLFLOW_MAX_PARAM]) for key, value in params.items()]
        for start in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + MLFLOW_BATCH])

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in row.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=folder.name)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run; offline by default, its folder under ``output_dir/wandb``."""

    def __init__(self, output_dir: Path, project: str, run_name: str, mode: WandbMode):
        import wandb

        # console="off": Ray Train patches the worker's stdout, and the progress lines are in
        # metrics.jsonl anyway; quiet still prints where the run folder is and how to sync it.
        settings = wandb.Settings(console="off", quiet=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(output_dir), mode=mode,
                              settings=settings)

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        self.run.log(row, step=step)

    def log_artifact(self, folder: Path) -> None:
        import wandb

        artifact = wandb.Artifact(f"{folder.name}-{self.run.id}", type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # ends the wandb-core process this run started, not at interpreter exit


def _run_name(tracking: TrackingConfig, output_dir: Path) -> str:
    return tracking.run_name or output_dir.name


def _mlflow(tracking: TrackingConfig, output_dir: Path) -> MLflowTracker:
    """The configured server, or a SQLite store in output_dir with the artifacts beside it (MLflow 3
    refuses its older file store, ``./mlruns``, unless MLFLOW_ALLOW_FILE_STORE is set)."""
    run_name = _run_name(tracking, output_dir)
    if tracking.mlflow_uri:
        return MLflowTracker(tracking.mlflow_uri, tracking.project, run_name)
    return MLflowTracker(f"sqlite:///{output_dir / MLFLOW_DB}", tracking.project, run_name,
                         (output_dir / MLFLOW_ARTIFACTS).as_uri())


BACKENDS: dict[TrackingBackend, Callable[[TrackingConfig, Path], Tracker]] = {
    "tensorboard": lambda tracking, output_dir: TensorBoardTracker(output_dir),
    "wandb": lambda tracking, output_dir: WandbTracker(
        output_dir, tracking.project, _run_name(tracking, output_dir), tracking.wandb_mode),
    "mlflow": _mlflow,
}


@dataclass
class TrackedRun:
    """What a run's trackers log besides its metrics: which backends, and the run's config as
    parameters. A plain record, so it travels to the Ray Train worker that opens the trackers."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    params: dict[str, Any] = field(default_factory=dict)  # the resolved config, flat dotted keys

    def open(self, output_dir: str | Path) -> list[Tracker]:
        """One tracker per backend, the params logged; if one fails to start, those already
        started are closed."""
        directory = Path(output_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        trackers: list[Tracker] = []
        try:
            for backend in self.tracking.backends:
                trackers.append(BACKENDS[backend](self.tracking, directory))
                trackers[-1].log_params(self.params)
        except BaseException:
            for tracker in trackers:
                tracker.close()
            raise
        return trackers

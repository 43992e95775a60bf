"""The training loop every supervised job shares: Ray Train workers running a DeepSpeed engine.

A job supplies a :class:`TrainTask` (what model, how a batch becomes a loss, how to evaluate and
save); this module owns the rest: each rank's share of the rows (from the object store), gradient
accumulation, LR schedule, progress lines, metrics JSONL, Ray Train checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from rlhf.metrics import MetricsWriter, emit, progress_line
from rlhf.runtime import derive_seed, init_ray, release_freed_memory, set_torch_threads, sigint_restored
from rlhf.tracking import TrackedRun
from rlhf.train.config import TrainConfig
from rlhf.train.deepspeed_setup import initialize, lr_lambda, training_config, zero3_init_context
from rlhf.train.zero_gather import Gather, parameter_gather, rank

if TYPE_CHECKING:
    from ray.train import Checkpoint

STATE_FILE = "train_state.json"
MODEL_DIR = "model"
DS_TAG = "deepspeed"
Rows = dict[str, list[Any]]
ModelT = TypeVar("ModelT")


class TrainTask(Protocol):
    """What a training job plugs into :func:`run_training`. Instances travel to every worker."""

    def build_model(self) -> nn.Module:
        """The trainable module; called inside the ZeRO-3 init context when stage 3 is on."""

    def loss(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of a micro-batch and per-batch metrics to average into the progress line."""

    def prepare(self, model: nn.Module, table: pa.Table) -> pa.Table:
        """``table`` with what the initial weights compute once, e.g. DPO's cached reference: every
        rank calls it on its shard and on the validation rows, in eval mode without gradients,
        before a checkpoint is restored, so resume and a restarted worker compute the same."""

    def evaluate(self, model: nn.Module, rows: Rows) -> dict[str, float]:
        """Validation metrics on ``rows``; every rank calls it with the same rows (ZeRO-3 lockstep)."""

    def finalize(self, model: nn.Module) -> None:
        """Last computation before the final save, e.g. statistics; every rank calls it."""

    def save(self, model: nn.Module, path: Path, gather: Gather) -> None:
        """Write ``model`` to ``path`` in Hugging Face layout: every rank calls it, ``gather`` gives
        ZeRO-3 shards their full values (``zero_gather.save_gathered``: a bucket at a time), rank 0 writes."""


def built(model: ModelT | None, task: TrainTask) -> ModelT:
    """The model ``task.build_model`` stored, for the task's other methods (the loop calls
    ``build_model`` first in every worker)."""
    if model is None:
        raise RuntimeError(f"{type(task).__name__}: build_model() has not run in this process")
    return model


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so resume continues at the same step."""

    step: int = 0  # optimizer steps
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    micro_steps: int = 0  # micro-batches in all, for gradient-accumulation boundaries
    samples: int = 0

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        return cls(**json.loads((directory / STATE_FILE).read_text()))


@dataclass
class LoopSettings:
    """Everything a worker needs besides the task; a plain object so Ray can ship it."""

    train: TrainConfig
    seed: int
    output_dir: str
    tracked: TrackedRun = field(default_factory=TrackedRun)  # rank 0 opens the run's trackers


# ---------------------------------------------------------------- worker side


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def rank_shard(table: pa.Table, rank: int, world: int) -> pa.Table:
    """Rank ``rank``'s contiguous share of ``table``: ``n // world`` rows each, so every rank runs
    the same number of micro-batches (ZeRO and DDP ranks step in lockstep)."""
    share = table.num_rows // world
    return table.slice(rank * share, share)


def epoch_batches(shard: pa.Table, cfg: TrainConfig, seed: int, epoch: int) -> Iterator[Rows]:
    """Full micro-batches of one epoch, the shard shuffled in an order fixed by (seed, epoch), so
    resume can replay it."""
    order = np.random.default_rng(derive_seed(seed, epoch)).permutation(shard.num_rows)
    for start in range(0, shard.num_rows - cfg.batch_size + 1, cfg.batch_size):
        yield shard.take(order[start:start + cfg.batch_size]).to_pydict()


class _MetricsLog:
    """Progress lines on stdout, metrics.jsonl and the experiment trackers, from rank 0 only."""

    def __init__(self, settings: LoopSettings, start_step: int):
        self.total = settings.train.max_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.writer = None
        if rank() == 0:
            trackers = settings.tracked.open(settings.output_dir)
            self.writer = MetricsWriter(settings.output_dir, step_key="step", trackers=trackers)

    def progress(self, state: TrainState, metrics: dict[str, float], lr: float, samples_s: float) -> None:
        if self.writer is None:
            return
        done = state.step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - state.step)
        self.writer.write({"event": "train", "step": state.step, "lr": lr, "samples_per_s": samples_s,
                           **metrics})
        emit(f"step {state.step}/{self.total} | {progress_line(metrics, list(metrics))} | lr {lr:.3g} | "
             f"{samples_s:.1f} samples/s | eta {eta:.0f}s")

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        self.writer.write({"event": "eval", "step": step, **metrics})
        emit(f"eval step {step} | {progress_line(metrics, list(metrics))}")

    def model(self, folder: Path) -> None:
        """The final model folder, to the trackers that store files."""
        if self.writer is not None:
            self.writer.log_artifact(folder)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Window:
    """Loss, metrics and throughput since the last progress line."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.start, self.samples, self.steps = time.time(), 0, 0

    def add(self, metrics: dict[str, float], samples: int) -> None:
        self.metrics.append(metrics)
        self.samples += samples

    def summary(self) -> tuple[dict[str, float], float, float]:
        """(mean metrics over ranks, samples/s, seconds per optimizer step)."""
        elapsed = max(time.time() - self.start, 1e-9)
        averaged = {k: sum(m[k] for m in self.metrics) / len(self.metrics) for k in self.metrics[0]}
        return _mean_across_ranks(averaged), self.samples / elapsed, elapsed / max(self.steps, 1)


def _peak_rss_mb() -> float:
    """Peak resident memory of the busiest rank, in MiB."""
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()


class _Worker:
    """One Ray Train rank: builds the engine, restores state, and runs the step loop."""

    def __init__(self, config: dict[str, Any]):
        import ray.train

        self.task: TrainTask = config["task"]
        self.settings: LoopSettings = config["settings"]
        self.cfg = self.settings.train
        set_torch_threads(self.cfg.cpus_per_worker, export_omp=True)
        torch.manual_seed(self.settings.seed)
        ds_config = training_config(self.cfg)
        with zero3_init_context(ds_config):
            model = self.task.build_model()
        self.engine, self.scheduler = initialize(model, ds_config, lr_lambda(self.cfg))
        context = ray.train.get_context()
        shard = rank_shard(ray.get(config["train_rows"]), context.get_world_rank(), context.get_world_size())
        validation = ray.get(config["validation_rows"]).slice(0, self.cfg.max_eval_rows)  # all, every rank
        self.engine.eval()
        with torch.no_grad():  # the initial weights, before _restore loads a checkpoint's
            self.shard = self.task.prepare(self.engine.module, shard)
            validation = self.task.prepare(self.engine.module, validation)
        release_freed_memory()  # what scoring freed, before the first training step's peak
        self.validation = validation.to_pydict() if validation.num_rows else {}
        self.state = self._restore(config["resume_from"])
        self.log = _MetricsLog(self.settings, self.state.step)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.last_eval: dict[str, float] = {}

    def _restore(self, resume_from: str | None) -> TrainState:
        """State from a restart inside this run (worker failure) or else the --resume checkpoint."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and resume_from:
            checkpoint = ray.train.Checkpoint(resume_from)
        if checkpoint is None:
            return TrainState()
        with checkpoint.as_directory() as directory:
            self.engine.load_checkpoint(directory, tag=DS_TAG)
            return TrainState.load(Path(directory))

    def run(self) -> None:
        if self.state.step == 0:  # the baseline every later evaluation is compared with
            self._evaluate()
        window = _Window()
        while self.state.step < self.cfg.max_steps:
            batches = epoch_batches(self.shard, self.cfg, self.settings.seed, self.state.epoch)
            for index, rows in enumerate(batches):
                if index < self.state.micro_in_epoch:
                    continue  # consumed before the checkpoint we resumed from
                self._micro_step(rows, window)
                if self.state.micro_steps % self.cfg.grad_accum_steps == 0:
                    window.steps += 1
                    window = self._after_optimizer_step(window)
                    if self.state.step >= self.cfg.max_steps:
                        return
            if self.state.samples == 0:
                raise RuntimeError("the training shard yielded no full batch; lower train.batch_size")
            self.state.epoch += 1
            self.state.micro_in_epoch = 0

    def _micro_step(self, rows: Rows, window: _Window) -> None:
        self.engine.train()
        loss, metrics = self.task.loss(self.engine, rows)
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed applies the optimizer only at accumulation boundaries
        n_rows = len(next(iter(rows.values()))) * self.world
        self.state.micro_in_epoch += 1
        self.state.micro_steps += 1
        self.state.samples += n_rows
        window.add({"loss": loss.item(), **metrics}, n_rows)

    def _after_optimizer_step(self, window: _Window) -> _Window:
        """Log, evaluate, finalize and checkpoint as due; returns the window to continue with."""
        self.state.step += 1
        step, cfg = self.state.step, self.cfg
        final = step >= cfg.max_steps
        if step % cfg.log_every == 0 or final:
            metrics, rate, step_time = window.summary()
            metrics.update(step_time_s=step_time, peak_rss_mb=_peak_rss_mb())
            self.log.progress(self.state, metrics, self.scheduler.get_last_lr()[0], rate)
            window = _Window()
        if step % cfg.eval_every == 0 or final:
            self._evaluate()
        if final:
            self.engine.eval()
            with torch.no_grad():
                self.task.finalize(self.engine.module)
        if step % cfg.save_every == 0 or final:
            self._save_checkpoint(final)
        return window

    def _save_checkpoint(self, final: bool) -> None:
        """Every rank writes its DeepSpeed shard; rank 0 adds the HF model and the train state, and
        hands the final model to the trackers (the folder output_dir/model is copied from)."""
        import ray.train

        directory = Path(tempfile.mkdtemp(prefix="rlhf-ckpt-"))
        self.engine.save_checkpoint(str(directory), tag=DS_TAG)
        gather = parameter_gather(self.cfg.deepspeed.zero_stage)
        self.task.save(self.engine.module, directory / MODEL_DIR, gather)
        if rank() == 0:
            self.state.save(directory)
        if final:
            self.log.model(directory / MODEL_DIR)
        checkpoint = ray.train.Checkpoint.from_directory(str(directory))
        ray.train.report({"step": self.state.step, **self.last_eval}, checkpoint=checkpoint)
        shutil.rmtree(directory, ignore_errors=True)

    def _evaluate(self) -> None:
        self.engine.eval()
        with torch.no_grad():
            self.last_eval = self.task.evaluate(self.engine.module, self.validation)
        self.log.evaluation(self.state.step, self.last_eval)


def run_rank(config: dict[str, Any]) -> None:
    """Body of each Ray Train rank (through :func:`rlhf.train.rank_entry.train_loop_per_worker`)."""
    worker = _Worker(config)
    try:
        worker.run()
    finally:
        worker.log.close()


# ---------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    model_dir: Path
    checkpoint_dir: Path
    metrics_path: Path


def latest_train_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The Ray Train checkpoint with the highest step under ``output_dir``, from any earlier run."""
    best: tuple[int, Path] | None = None
    for state_file in Path(output_dir).glob(f"ray_train-*/checkpoint_*/{STATE_FILE}"):
        step = json.loads(state_file.read_text())["step"]
        if best is None or step > best[0]:
            best = (step, state_file.parent)
    return best[1] if best else None


def check_data_size(n_train: int, cfg: TrainConfig) -> None:
    """Fail before starting workers when a worker could not fill a single micro-batch."""
    needed = cfg.num_workers * cfg.batch_size
    if n_train < needed:
        raise ValueError(
            f"train.batch_size: {n_train} training rows cannot fill one batch of "
            f"{cfg.batch_size} on each of {cfg.num_workers} workers; lower batch_size or add data"
        )


def run_training(
    task: TrainTask,
    settings: LoopSettings,
    train_rows: pa.Table,
    validation_rows: pa.Table,
    resume: bool = False,
) -> TrainResult:
    """Train ``task`` on Ray Train; the final model is copied to ``output_dir/model``."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rlhf.train.rank_entry import train_loop_per_worker

    cfg = settings.train
    check_data_size(train_rows.num_rows, cfg)
    output_dir = Path(settings.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = None
    if resume:
        resume_from = latest_train_checkpoint(output_dir)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {output_dir}; run without it")
        emit(f"resuming from {resume_from}")

    init_ray()
    # The rows are in the driver's memory already: one copy in the object store, which ranks on a
    # node read without copying (Ray Data's split would add two actors and tasks per run). The whole
    # config is one more reference, so Ray Train's controller never unpickles the task (rank_entry).
    run = {
        "task": task,
        "settings": dataclasses.replace(settings, output_dir=str(output_dir)),
        "resume_from": str(resume_from) if resume_from else None,
        "train_rows": ray.put(train_rows),
        "validation_rows": ray.put(validation_rows),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": ray.put(run)},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"ray_train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=str(output_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    with sigint_restored():
        result = trainer.fit()
    return _final_model(result.checkpoint, output_dir)


def _final_model(checkpoint: Checkpoint | None, output_dir: Path) -> TrainResult:
    """The last checkpoint's model copied to ``output_dir/model``."""
    if checkpoint is None:  # the loop reports one at its end, so fit() returned early
        raise RuntimeError(f"training in {output_dir} finished without reporting a checkpoint")
    checkpoint_dir = Path(checkpoint.path)
    model_dir = output_dir / MODEL_DIR
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(checkpoint_dir / MODEL_DIR, model_dir)
    return TrainResult(model_dir, checkpoint_dir, output_dir / "metrics.jsonl")

"""The training loop every supervised job shares: Ray Train workers running a DeepSpeed engine.

A job supplies a :class:`TrainTask` (what model, how a batch becomes a loss, how to evaluate and
save); this module owns the rest: sharded Ray Data input, gradient accumulation, LR schedule,
progress lines, metrics JSONL, Ray Train checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from rlhf.config.sections import TrainConfig
from rlhf.train import engine as ds

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
MODEL_DIR = "model"
DS_TAG = "deepspeed"
Rows = dict[str, list[Any]]


class TrainTask(Protocol):
    """What a training job plugs into :func:`run_training`. Instances travel to every worker."""

    def build_model(self) -> nn.Module:
        """The trainable module; called inside the ZeRO-3 init context when stage 3 is on."""

    def loss(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of a micro-batch and per-batch metrics to average into the progress line."""

    def evaluate(self, model: nn.Module, rows: Rows) -> dict[str, float]:
        """Validation metrics on ``rows``; every rank calls it with the same rows (ZeRO-3 lockstep)."""

    def finalize(self, model: nn.Module) -> None:
        """Last computation before the final save, e.g. statistics; every rank calls it."""

    def save(self, model: nn.Module, path: Path) -> None:
        """Write ``model`` to ``path`` in Hugging Face layout; called on rank 0 with full weights."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so resume continues at the same step."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
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


# ---------------------------------------------------------------- worker side


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _epoch_batches(shard: Any, cfg: TrainConfig, seed: int, epoch: int) -> Iterator[Rows]:
    """Micro-batches of one epoch in an order fixed by (seed, epoch), so resume can replay it."""
    for batch in shard.iter_batches(
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        drop_last=True,
        local_shuffle_buffer_size=cfg.batch_size * 8,
        local_shuffle_seed=seed * 1000 + epoch,
    ):
        yield batch.to_pydict()


def _read_all(shard: Any, limit: int) -> Rows:
    tables = []
    for batch in shard.iter_batches(batch_size=limit, batch_format="pyarrow"):
        tables.append(batch)
    return pa.concat_tables(tables).slice(0, limit).to_pydict() if tables else {}


def _emit(line: str) -> None:
    """Write straight to stdout: Ray Train's patched ``print`` shows each line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _MetricsLog:
    """Progress lines on stdout and one JSON object per event in metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.enabled = _rank() == 0

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, state: TrainState, metrics: dict[str, float], lr: float, samples_s: float):
        done = state.step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - state.step)
        record = {"event": "train", "step": state.step, "lr": lr, "samples_per_s": samples_s, **metrics}
        self.write(record)
        if self.enabled:
            shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            _emit(
                f"step {state.step}/{self.total} | {shown} | lr {lr:.3g} | "
                f"{samples_s:.1f} samples/s | eta {eta:.0f}s"
            )

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self.write({"event": "eval", "step": step, **metrics})
        if self.enabled:
            shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            _emit(f"eval step {step} | {shown}")


def _save_checkpoint(task: TrainTask, engine: Any, state: TrainState, zero_stage: int,
                     metrics: dict[str, float]) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 adds the HF model and the train state."""
    import ray.train

    directory = Path(tempfile.mkdtemp(prefix="rlhf-ckpt-"))
    engine.save_checkpoint(str(directory), tag=DS_TAG)
    with ds.gathered_params(engine.module, zero_stage):
        if _rank() == 0:
            task.save(engine.module, directory / MODEL_DIR)
            state.save(directory)
    checkpoint = ray.train.Checkpoint.from_directory(str(directory))
    ray.train.report({"step": state.step, **metrics}, checkpoint=checkpoint)
    shutil.rmtree(directory, ignore_errors=True)


def _evaluate(task: TrainTask, engine: Any, validation: Rows, log: _MetricsLog, step: int):
    engine.eval()
    with torch.no_grad():
        metrics = task.evaluate(engine.module, validation)
    log.evaluation(step, metrics)
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker."""
    import ray.train

    task: TrainTask = config["task"]
    settings: LoopSettings = config["settings"]
    cfg = settings.train
    ds.set_threads_for_worker(cfg.cpus_per_worker)
    torch.manual_seed(settings.seed)

    with ds.zero3_init_context(ds.deepspeed_config(cfg)):
        model = task.build_model()
    engine, scheduler = ds.initialize(model, cfg)

    state = TrainState()
    # A restart inside this run (worker failure) wins over the --resume checkpoint.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config["resume_from"]:
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag=DS_TAG)
            state = TrainState.load(Path(directory))

    shard = ray.train.get_dataset_shard("train")
    validation = _read_all(ray.train.get_dataset_shard("validation"), cfg.max_eval_rows)
    log = _MetricsLog(settings.output_dir, cfg.max_steps, state.step)
    world = dist.get_world_size() if dist.is_initialized() else 1

    if state.step == 0:  # the baseline every later evaluation is compared with
        _evaluate(task, engine, validation, log, 0)
    window: list[dict[str, float]] = []
    window_start, window_samples = time.time(), 0
    last_eval: dict[str, float] = {}
    while state.step < cfg.max_steps:
        for index, rows in enumerate(_epoch_batches(shard, cfg, settings.seed, state.epoch)):
            if index < state.micro_in_epoch:
                continue  # consumed before the checkpoint we resumed from
            engine.train()
            loss, metrics = task.loss(engine, rows)
            engine.backward(loss)
            engine.step()
            state.micro_in_epoch += 1
            n_rows = len(next(iter(rows.values())))
            state.samples += n_rows * world
            window_samples += n_rows * world
            window.append({"loss": loss.item(), **metrics})
            if state.micro_in_epoch % cfg.grad_accum_steps:
                continue
            state.step += 1
            final = state.step >= cfg.max_steps
            if state.step % cfg.log_every == 0 or final:
                averaged = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                averaged = _mean_across_ranks(averaged)
                rate = window_samples / max(time.time() - window_start, 1e-9)
                log.progress(state, averaged, scheduler.get_last_lr()[0], rate)
                window, window_start, window_samples = [], time.time(), 0
            if state.step % cfg.eval_every == 0 or final:
                last_eval = _evaluate(task, engine, validation, log, state.step)
            if final:
                engine.eval()
                with torch.no_grad():
                    task.finalize(engine.module)
            if state.step % cfg.save_every == 0 or final:
                _save_checkpoint(task, engine, state, cfg.zero_stage, last_eval)
            if final:
                break
        else:
            state.epoch += 1
            state.micro_in_epoch = 0
            if state.samples == 0:
                raise RuntimeError("the training shard yielded no full batch; lower train.batch_size")


# ---------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    model_dir: Path
    checkpoint_dir: Path
    metrics_path: Path


def quiet_ray_data() -> None:
    """Ray Data's per-dataset progress bars drown the training progress lines; turn them off."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_operator_progress_bars = False


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step under ``output_dir``, from any earlier run."""
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
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = settings.train
    check_data_size(train_rows.num_rows, cfg)
    output_dir = Path(settings.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(output_dir)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {output_dir}; run without it")
        print(f"resuming from {resume_from}", flush=True)

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    quiet_ray_data()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "task": task,
            "settings": dataclasses.replace(settings, output_dir=str(output_dir)),
            "resume_from": str(resume_from) if resume_from else None,
        },
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
        datasets={
            "train": ray.data.from_arrow(train_rows),
            "validation": ray.data.from_arrow(validation_rows),
        },
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options=ExecutionOptions(preserve_order=True),
        ),
    )
    result = trainer.fit()
    checkpoint_dir = Path(result.checkpoint.path)
    model_dir = output_dir / MODEL_DIR
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(checkpoint_dir / MODEL_DIR, model_dir)
    return TrainResult(model_dir, checkpoint_dir, output_dir / "metrics.jsonl")

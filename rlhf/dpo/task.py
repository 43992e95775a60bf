"""DPO on the shared Ray Train + DeepSpeed loop: the task, the cached reference, and the job.

The policy trains in the loop's train mode with the checkpoint's dropout unless
``dpo.dropout=false``; the reference (cached or online) and every validation pass score in eval
mode without dropout, so at step 0 validation sees pi == pi_ref exactly (loss log 2 for sigmoid).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pyarrow as pa
import torch
from torch import nn

from rlhf.cli import tracked_run
from rlhf.config.sections import DType, LoraConfig, ModelConfig
from rlhf.dpo.config import DPOAlgoConfig, DPOConfig
from rlhf.dpo.loss import dpo_loss
from rlhf.dpo.pairs import pair_logprobs
from rlhf.errors import InputError
from rlhf.metrics import emit
from rlhf.models import Policy, load_policy, resolve_dtype
from rlhf.models.scoring import load_frozen_policy
from rlhf.runtime import compute_device, init_ray, quiet_ray_data, set_torch_threads
from rlhf.store import check_url
from rlhf.tracking import TrackedRun
from rlhf.train.config import TrainConfig
from rlhf.train.data import human_comparisons
from rlhf.train.supervised_loop import LoopSettings, Rows, TrainResult, built, check_data_size, run_training
from rlhf.train.zero_gather import Gather, save_policy

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # the cached reference, one value per row
PROGRESS_EVERY_S = 30.0  # a progress line at most this often while the reference scores
ROW_COLUMN = "_dpo_row"  # restores the table's order after Ray Data scored it


@dataclass
class DPOTask:
    """Policy log-probs of the chosen and rejected summaries in one pass, against the reference."""

    model_cfg: ModelConfig
    algo: DPOAlgoConfig
    batch_size: int
    dtype: DType
    lora: LoraConfig = field(default_factory=LoraConfig)
    policy: Policy | None = field(default=None, repr=False)
    reference: Policy | None = field(default=None, repr=False)

    def build_model(self) -> nn.Module:
        self.policy = load_policy(self.model_cfg, dropout=self.algo.dropout, lora=self.lora)
        return self.policy.model

    def _reference(self, rows: Rows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs (B,) each: the cached columns, the base with the
        adapter off (LoRA: the initial policy, with no second copy loaded), or the frozen copy."""
        if self.algo.reference == "cached":
            chosen, rejected = (torch.tensor(rows[name], dtype=torch.float32, device=device)
                                for name in REF_COLUMNS)
            return chosen, rejected
        if built(self.policy, self).adapted:
            return self._base_logprobs(rows)
        if self.reference is None:  # not in build_model: ZeRO-3's init context would partition it
            self.reference = load_frozen_policy(self.model_cfg, resolve_dtype(self.dtype, device))
            self.reference.model.to(device)
        with torch.no_grad():
            return pair_logprobs(self.reference.model, self.reference, rows)

    def _base_logprobs(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapted policy's base, adapter disabled and dropout off, as the reference."""
        policy = built(self.policy, self)
        model = policy.model
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), model.disable_adapter():
                return pair_logprobs(model, policy, rows)
        finally:
            model.train(training)

    def _terms(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss and the metrics: implicit-reward accuracy and margin, mean log-probs."""
        chosen, rejected = pair_logprobs(model, built(self.policy, self), rows)
        ref_chosen, ref_rejected = self._reference(rows, chosen.device)
        losses, chosen_reward, rejected_reward = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.algo.beta, self.algo.loss,
            self.algo.label_smoothing,
        )
        return losses.mean(), {
            "accuracy": (chosen_reward > rejected_reward).float().mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
            "chosen_logps": chosen.detach().mean(),
            "rejected_logps": rejected.detach().mean(),
        }

    def loss(self, model: nn.Module, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self._terms(model, rows)
        return loss, {name: value.item() for name, value in metrics.items()}

    def evaluate(self, model: nn.Module, rows: Rows) -> dict[str, float]:
        """The training metrics on the validation pairs, row-weighted over chunks of batch_size."""
        n = len(rows["choice"])
        totals: dict[str, float] = {}
        for start in range(0, n, self.batch_size):
            chunk = {k: v[start : start + self.batch_size] for k, v in rows.items()}
            loss, metrics = self._terms(model, chunk)
            for name, value in {"loss": loss, **metrics}.items():
                totals[f"val_{name}"] = totals.get(f"val_{name}", 0.0) + value.item() * len(chunk["choice"])
        return {name: total / n for name, total in totals.items()}

    def finalize(self, model: nn.Module) -> None:
        """Nothing to compute after DPO."""

    def save(self, model: nn.Module, path: Path, gather: Gather) -> None:
        # as SFT saves: what PPO and Serve read
        save_policy(built(self.policy, self), path, self.lora.publish, gather)


class _ReferenceScorer:
    """Ray Data actor holding the frozen initial policy: adds ``REF_COLUMNS`` to each batch."""

    def __init__(self, model_cfg: ModelConfig, train: TrainConfig):
        set_torch_threads(train.cpus_per_worker, export_omp=True)
        device = compute_device(1.0 if train.use_gpu else 0.0)
        self.reference = load_frozen_policy(model_cfg, resolve_dtype(train.dtype, device))
        self.reference.model.to(device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with torch.no_grad():
            scores = pair_logprobs(self.reference.model, self.reference, batch.to_pydict())
        for name, values in zip(REF_COLUMNS, scores):
            batch = batch.append_column(name, pa.array(values.double().cpu().numpy()))
        return batch


def with_reference_logprobs(table: pa.Table, model_cfg: ModelConfig, train: TrainConfig) -> pa.Table:
    """``table`` plus the reference's log-probs of each row's chosen and rejected summary, scored
    once before training by ``train.num_workers`` Ray Data actors (a GPU each with use_gpu)."""
    import ray

    init_ray()
    quiet_ray_data()
    indexed = table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64()))
    scored = ray.data.from_arrow(indexed).map_batches(
        _ReferenceScorer, fn_constructor_kwargs={"model_cfg": model_cfg, "train": train},
        batch_size=train.batch_size, batch_format="pyarrow", concurrency=train.num_workers,
        num_cpus=train.cpus_per_worker, num_gpus=1 if train.use_gpu else 0,
    )
    tables, done, start, shown = [], 0, time.time(), time.time()
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        block = cast(pa.Table, batch)  # batch_format="pyarrow": a table; Ray types every format
        tables.append(block)
        done += block.num_rows
        if done == table.num_rows or time.time() - shown > PROGRESS_EVERY_S:  # minutes at real size
            emit(f"dpo: reference log-probs {done}/{table.num_rows} pairs | "
                 f"{done / max(time.time() - start, 1e-9):.1f} pairs/s")
            shown = time.time()
    return pa.concat_tables(tables).sort_by(ROW_COLUMN).drop_columns([ROW_COLUMN])


def train_dpo_policy(
    model_cfg: ModelConfig, train_cfg: TrainConfig, algo: DPOAlgoConfig, train: pa.Table,
    validation: pa.Table, output_dir: str, seed: int, resume: bool = False, lora: LoraConfig | None = None,
    tracked: TrackedRun | None = None,
) -> TrainResult:
    """DPO of ``model_cfg`` (also the reference) on comparisons; jobs/dpo.py and online cycles call it
    (a cycle's run logs to tensorboard only: ``tracked`` None)."""
    check_data_size(train.num_rows, train_cfg)  # before the reference pass
    validation = validation.slice(0, train_cfg.max_eval_rows)  # all the loop validates on
    if algo.reference == "cached":  # one Ray Data pass over both tables
        emit(f"dpo: scoring {train.num_rows + validation.num_rows} pairs with the reference")
        scored = with_reference_logprobs(pa.concat_tables([train, validation]), model_cfg, train_cfg)
        train, validation = scored.slice(0, train.num_rows), scored.slice(train.num_rows)
    task = DPOTask(model_cfg, algo, train_cfg.batch_size, train_cfg.dtype, lora or LoraConfig())
    settings = LoopSettings(train_cfg, seed, output_dir, tracked or TrackedRun())
    return run_training(task, settings, train, validation, resume=resume)


def run_dpo(cfg: DPOConfig, resume: bool = False) -> TrainResult:
    """Train the policy on comparisons; ``output_dir/model`` holds it as a policy folder."""
    if cfg.from_store:
        check_url(cfg.store.url)  # fail in seconds, before Ray starts
    train, validation = human_comparisons(cfg, "dpo")
    if train is None or validation is None or not train.num_rows:
        raise InputError("data: no comparisons to train on; set data.path, or from_store=true with "
                         "decided choices in store.url")
    emit(f"dpo: {train.num_rows} training pairs, {validation.num_rows} validation")
    return train_dpo_policy(cfg.model, cfg.train, cfg.dpo, train, validation, cfg.output_dir, cfg.seed,
                            resume=resume, lora=cfg.lora, tracked=tracked_run(cfg))

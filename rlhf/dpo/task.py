"""DPO on the shared Ray Train + DeepSpeed loop: the task (with its cached reference) and the job.

The policy trains in the loop's train mode with the checkpoint's dropout unless
``dpo.dropout=false``; the reference (cached or online) and every validation pass score in eval
mode without dropout, so at step 0 validation sees pi == pi_ref exactly (loss log 2 for sigmoid).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

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
from rlhf.store import check_url
from rlhf.tracking import TrackedRun
from rlhf.train.config import TrainConfig
from rlhf.train.data import human_comparisons
from rlhf.train.supervised_loop import LoopSettings, Rows, TrainResult, built, run_training
from rlhf.train.zero_gather import Gather, rank, save_policy

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # the cached reference, one value per row
PROGRESS_EVERY_S = 30.0  # a progress line at most this often while the reference scores


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

    def prepare(self, model: nn.Module, table: pa.Table) -> pa.Table:
        """With ``dpo.reference=cached``: ``table`` plus ``REF_COLUMNS``, scored by ``model`` itself
        before its first update (its initial weights are the reference, a fresh adapter adds
        nothing): no second copy is loaded, and under ZeRO-3 the scoring runs partitioned."""
        if self.algo.reference != "cached":
            return table
        policy = built(self.policy, self)
        chosen: list[torch.Tensor] = []
        rejected: list[torch.Tensor] = []
        start = shown = time.time()
        for offset in range(0, table.num_rows, self.batch_size):
            rows = table.slice(offset, self.batch_size).to_pydict()
            for scores, got in zip((chosen, rejected), pair_logprobs(model, policy, rows)):
                scores.append(got.double().cpu())
            done = min(offset + self.batch_size, table.num_rows)
            if rank() == 0 and (done == table.num_rows or time.time() - shown > PROGRESS_EVERY_S):
                emit(f"dpo: reference log-probs {done}/{table.num_rows} pairs on rank 0 | "
                     f"{done / max(time.time() - start, 1e-9):.1f} pairs/s")
                shown = time.time()
        for name, scores in zip(REF_COLUMNS, (chosen, rejected)):
            values = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
            table = table.append_column(name, pa.array(values.numpy()))
        return table

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


def train_dpo_policy(
    model_cfg: ModelConfig, train_cfg: TrainConfig, algo: DPOAlgoConfig, train: pa.Table,
    validation: pa.Table, output_dir: str, seed: int, resume: bool = False, lora: LoraConfig | None = None,
    tracked: TrackedRun | None = None,
) -> TrainResult:
    """DPO of ``model_cfg`` (also the reference) on comparisons; jobs/dpo.py and online cycles call it
    (a cycle's run logs to tensorboard only: ``tracked`` None)."""
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

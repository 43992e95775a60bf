"""The PPO driver loop as a plain class: Ray-free, so a test can drive it with local roles.

An iteration is a dozen named steps: sample documents, generate, score, reference log-probs,
old log-probs and values, rewards and advantages (``ppo.advantage``'s estimator), PPO epochs,
weight sync, KL control, logging, checkpoint and publish. The roles behind it are local objects or
Ray actor groups.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from rlhf.metrics import IterationMetrics, emit
from rlhf.ppo import functional as F
from rlhf.ppo.batch import PPOBatch
from rlhf.ppo.config import PPOAlgoConfig, PPOConfig
from rlhf.ppo.estimators import ScoredRollout
from rlhf.ppo.experience import Rollout
from rlhf.ppo.roles import LearnStats, PendingRollout
from rlhf.ppo.weight_sync import SyncReport
from rlhf.registry import PolicyRegistry
from rlhf.runtime import derive_seed

TRAINER_STATE = "trainer_state.json"


class Roles(Protocol):
    """What the loop needs from the roles, wherever they run."""

    version: int  # weight syncs sent to the generators

    def generate(self, documents: list[str], seed: int) -> Rollout: ...
    def start_generate(self, documents: list[str], seed: int) -> PendingRollout: ...
    def score(self, documents: list[str], summaries: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...
    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor: ...
    def evaluate(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]: ...
    def train(self, batch: PPOBatch) -> LearnStats: ...
    def sync(self) -> SyncReport: ...
    def save_policy(self, path: str) -> None: ...
    def save_checkpoint(self, path: str) -> None: ...
    def load_checkpoint(self, path: str) -> None: ...


class PromptStream:
    """Documents in a seeded order per epoch, with a cursor that checkpoints save and restore."""

    def __init__(self, epoch_documents: Callable[[int], Iterator[str]]):
        self._epoch_documents = epoch_documents
        self.seek(0, 0)

    def seek(self, epoch: int, position: int) -> None:
        """Continue at document ``position`` of ``epoch`` (replays the epoch's seeded order)."""
        self.epoch, self.position = epoch, position
        self._iterator = self._open()

    def _open(self) -> Iterator[str]:
        iterator = self._epoch_documents(self.epoch)
        for _ in range(self.position):  # replay to the saved cursor
            next(iterator)
        return iterator

    def next_batch(self, size: int) -> list[str]:
        documents: list[str] = []
        while len(documents) < size:
            try:
                documents.append(next(self._iterator))
                self.position += 1
            except StopIteration:
                if self.position == 0:
                    raise ValueError("prompts: the dataset has no documents") from None
                self.epoch, self.position = self.epoch + 1, 0
                self._iterator = self._open()
        return documents

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def apply_no_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of summaries that never emitted EOS by ``penalty`` (None = keep)."""
    if penalty is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, penalty))


def build_batch(
    rollout: Rollout, scores: torch.Tensor, logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor,
    values: torch.Tensor, kl_coef: float, algo: PPOAlgoConfig,
) -> PPOBatch:
    """Rewards, advantages and returns (all (B, T)) for a scored rollout, by ``ppo.advantage``'s
    estimator (``rlhf.ppo.estimators``).

    ``kl_coef`` weighs the KL where ``ppo.kl_in`` puts it: the per-token reward or the loss.
    """
    reward_kl, loss_kl = (kl_coef, 0.0) if algo.kl_in == "reward" else (0.0, kl_coef)
    scored = ScoredRollout(scores, logprobs, ref_logprobs, values, rollout.mask)
    rewards, advantages, returns = algo.estimator.estimate(scored, reward_kl, algo)
    return PPOBatch(rollout, scores, logprobs, ref_logprobs, values, rewards, advantages, returns, loss_kl)


class RoleTimer:
    """Wall time per role within one iteration."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, role: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[role] = self.seconds.get(role, 0.0) + time.perf_counter() - start


@dataclass
class TrainerState:
    """What a checkpoint restores besides the learner: iteration, data cursor, KL controller."""

    iteration: int
    prompts: dict[str, int]
    kl: dict[str, float]


class PPOTrainer:
    """Runs PPO iterations over ``roles``, logging, checkpointing and publishing as configured."""

    def __init__(self, cfg: PPOConfig, roles: Roles, prompts: PromptStream,
                 log: Callable[[IterationMetrics], None]):
        self.cfg, self.roles, self.prompts, self.log = cfg, roles, prompts, log
        algo = cfg.ppo
        self.kl = (F.AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
                   if algo.kl_target is not None else F.FixedKLController(algo.kl_coef))
        self.iteration = 0
        # ppo.async_rollout: the next iteration's rows, being sampled, and the data cursor before
        # them (a checkpoint resumes there and samples them again)
        self._pending: tuple[list[str], PendingRollout] | None = None
        self._cursor_before_pending: dict[str, int] | None = None
        self.output_dir = Path(cfg.output_dir)
        self.registry = PolicyRegistry(cfg.registry or self.output_dir / "registry")

    def run(self) -> list[IterationMetrics]:
        history = []
        while self.iteration < self.cfg.ppo.iterations:
            metrics = self.step()
            history.append(metrics)
            self.log(metrics)
            self._checkpoint_and_publish(metrics)
        return history

    def step(self) -> IterationMetrics:
        """One PPO iteration; returns its metrics."""
        algo, timer, start = self.cfg.ppo, RoleTimer(), time.perf_counter()
        with timer("generate"):
            rows, rollout, behaviour_logprobs, lag = self._rollout()
        with timer("score"):
            raw, scores = self.roles.score(rows, rollout.summaries)
        scores = apply_no_eos_penalty(scores, rollout.ended, algo.no_eos_penalty)
        with timer("reference"):
            ref_logprobs = self.roles.ref_logprobs(rollout)
        with timer("learn"):
            # pi_old: the sampling weights' log-probs (async_rollout), else the learner's own forward
            # before the update (single_update) or its old-log-prob pass; values only with a critic
            evaluated = algo.uses_critic or (behaviour_logprobs is None and not algo.single_update)
            logprobs, values = (self.roles.evaluate(rollout) if evaluated
                                else (None, torch.zeros_like(ref_logprobs)))
            if behaviour_logprobs is not None:
                logprobs = behaviour_logprobs
            batch = build_batch(rollout, scores, logprobs, ref_logprobs, values, self.kl.value, algo)
            stats = self.roles.train(batch)
        with timer("sync"):
            sync = self.roles.sync()
        learned = asdict(stats)
        update_kl = learned.pop("update_kl")
        kl_mean = (update_kl if logprobs is None
                   else (F.kl_penalty(logprobs, ref_logprobs, "k1") * rollout.mask).sum(1).mean().item())
        kl_coef = self.kl.value
        self.kl.update(kl_mean, algo.rollout_batch_size)
        self.iteration += 1
        lengths = rollout.mask.sum(1)  # (B,)
        seconds = timer.seconds
        return IterationMetrics(
            iteration=self.iteration,
            reward_mean=raw.mean().item(),
            reward_used_mean=scores.mean().item(),
            kl_mean=kl_mean,
            kl_coef=kl_coef,
            **learned,  # a LearnStats field IterationMetrics lacks is a TypeError here
            explained_variance=(F.explained_variance(values, batch.returns, rollout.mask).item()
                                if algo.uses_critic else float("nan")),
            response_length_mean=lengths.mean().item(),
            eos_fraction=rollout.ended.float().mean().item(),
            generate_tokens_per_s=lengths.sum().item() / max(seconds["generate"], 1e-9),
            rollout_lag=lag,
            sync_transfer_s=sync.seconds,
            sync_bytes=sync.bytes,
            time_s=time.perf_counter() - start,
            time_generate_s=seconds["generate"],
            time_score_s=seconds["score"],
            time_reference_s=seconds["reference"],
            time_learn_s=seconds["learn"],
            time_sync_s=seconds["sync"],
        )

    def _rollout(self) -> tuple[list[str], Rollout, torch.Tensor | None, int]:
        """This iteration's rows (each document k times, consecutive: one sampling pass draws every
        row with its own noise), their rollout, the sampling weights' log-probs (``async_rollout``,
        else None) and how many updates those weights were behind the learner's."""
        if not self.cfg.ppo.async_rollout:
            rows = self._next_rows()
            return rows, self.roles.generate(rows, seed=derive_seed(self.cfg.seed, self.iteration)), None, 0
        if self._pending is None:  # the first iteration, also after a resume
            self._start_sampling(self.iteration)
        assert self._pending is not None
        rows, pending = self._pending
        behaviour = pending.result()
        self._pending = self._cursor_before_pending = None
        if self.iteration + 1 < self.cfg.ppo.iterations:
            self._start_sampling(self.iteration + 1)  # with the weights this update starts from
        return rows, behaviour.rollout, behaviour.logprobs, self.roles.version - behaviour.version

    def _next_rows(self) -> list[str]:
        documents = self.prompts.next_batch(self.cfg.ppo.rollout_batch_size)
        return [document for document in documents for _ in range(self.cfg.ppo.samples_per_document)]

    def _start_sampling(self, iteration: int) -> None:
        """Start sampling iteration ``iteration``'s rows (0-based) with the generators' weights."""
        self._cursor_before_pending = self.prompts.state()
        rows = self._next_rows()
        self._pending = rows, self.roles.start_generate(rows, seed=derive_seed(self.cfg.seed, iteration))

    # ------------------------------------------------------------ checkpoints and versions

    def _due(self, every: int) -> bool:
        return self.iteration % every == 0 or self.iteration == self.cfg.ppo.iterations

    def _checkpoint_and_publish(self, metrics: IterationMetrics) -> None:
        if self._due(self.cfg.ppo.checkpoint_every):
            self.save_checkpoint()
        if self._due(self.cfg.ppo.publish_every):
            version = self.registry.publish(lambda folder: self.roles.save_policy(str(folder)),
                                            metrics.to_record())
            emit(f"published policy {version}")

    def save_checkpoint(self) -> Path:
        folder = self.output_dir / "checkpoints" / f"iter_{self.iteration:06d}"
        self.roles.save_checkpoint(str(folder))
        cursor = self._cursor_before_pending or self.prompts.state()  # a pending batch is sampled again
        state = TrainerState(self.iteration, cursor, self.kl.state_dict())
        (folder / TRAINER_STATE).write_text(json.dumps(asdict(state)))
        return folder

    def restore(self, folder: Path) -> None:
        """Continue from ``folder``: learner, data cursor and KL controller as they were saved."""
        state = TrainerState(**json.loads((folder / TRAINER_STATE).read_text()))
        self.roles.load_checkpoint(str(folder))
        self.iteration = state.iteration
        self.prompts.seek(state.prompts["epoch"], state.prompts["position"])
        self._pending = self._cursor_before_pending = None
        self.kl.load_state_dict(state.kl)


def latest_ppo_checkpoint(output_dir: str | Path) -> Path | None:
    """The PPO checkpoint (``checkpoints/iter_*``) with the highest iteration under ``output_dir``."""
    folders = sorted((Path(output_dir) / "checkpoints").glob(f"iter_*/{TRAINER_STATE}"))
    return folders[-1].parent if folders else None

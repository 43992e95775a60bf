"""The typed PPO batch that moves between roles: one rollout plus everything scored on it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from rlhf.ppo.experience import Rollout


@dataclass
class PPOBatch:
    """A scored rollout ready for PPO epochs. Token tensors are (B, T), aligned with
    ``rollout.response_ids`` and zero where ``rollout.mask`` is 0."""

    rollout: Rollout
    scores: torch.Tensor  # (B,) reward per summary, after normalisation and penalties
    # (B, T) log pi_old(a_t | s_t) under the policy that sampled; None with ppo.single_update,
    # where the learner's forward before its one step is pi_old
    logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(a_t | s_t) under the frozen initial policy
    values: torch.Tensor  # (B, T) V_old(s_t) before each response token; 0 without a value model
    rewards: torch.Tensor  # (B, T) -kl_coef * KL per token (0 with ppo.kl_in=loss), score at the last token
    advantages: torch.Tensor  # (B, T) by ppo.advantage: GAE (whitened when configured) or critic-free
    returns: torch.Tensor  # (B, T) advantages + values (value targets); 0 without a value model
    loss_kl_coef: float = 0.0  # weight of the KL term in the policy loss (ppo.kl_in=loss), else 0

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.mask  # (B, T)

    def __len__(self) -> int:
        return self.scores.shape[0]

    def select(self, index: torch.Tensor | slice) -> PPOBatch:
        """Rows ``index`` (a minibatch or a learner's shard)."""
        tensors: dict[str, Any] = {name: tensor[index] for name, tensor in self._row_tensors().items()}
        return replace(self, rollout=self.rollout.select(index), **tensors)

    def to(self, device: torch.device | str) -> PPOBatch:
        tensors: dict[str, Any] = {name: tensor.to(device) for name, tensor in self._row_tensors().items()}
        return replace(self, rollout=self.rollout.to(device), **tensors)

    def _row_tensors(self) -> dict[str, torch.Tensor]:
        """The fields with one row per summary (all but the rollout and the loss's KL weight) that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("rollout", "loss_kl_coef") and getattr(self, f.name) is not None}

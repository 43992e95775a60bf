"""The typed PPO batch that moves between roles: one rollout plus everything scored on it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from rlhf.ppo.experience import Rollout


@dataclass
class PPOBatch:
    """A scored rollout ready for PPO epochs. Token tensors are (B, T), aligned with
    ``rollout.response_ids`` and zero where ``rollout.mask`` is 0."""

    rollout: Rollout
    scores: torch.Tensor  # (B,) reward per summary, after normalisation and penalties
    logprobs: torch.Tensor  # (B, T) log pi_old(a_t | s_t) under the policy that sampled
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(a_t | s_t) under the frozen initial policy
    values: torch.Tensor  # (B, T) V_old(s_t) before each response token
    rewards: torch.Tensor  # (B, T) -kl_coef * KL per token, score added at the last token
    advantages: torch.Tensor  # (B, T) GAE, whitened over the batch when configured
    returns: torch.Tensor  # (B, T) advantages + values (value targets)

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.mask  # (B, T)

    def __len__(self) -> int:
        return self.scores.shape[0]

    def select(self, index: torch.Tensor) -> PPOBatch:
        """Rows ``index`` (a minibatch or a learner's shard)."""
        tensors = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "rollout"}
        return replace(self, rollout=self.rollout.select(index), **tensors)

    def to(self, device: torch.device | str) -> PPOBatch:
        tensors = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "rollout"}
        return replace(self, rollout=self.rollout.to(device), **tensors)

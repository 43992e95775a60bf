"""A DPO policy read as a reward model: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).

What jobs/eval.py scores comparisons with when ``dpo_policy`` is set, and what the online loop's
``method=dpo`` gate judges; both go through ``rlhf.eval.metrics.evaluate_reward_model``, so the
accuracy, length baseline and similar-length numbers are the ones a reward model gets.
"""

from __future__ import annotations

import torch

from rlhf.config.sections import ModelConfig, RewardHeads, RewardScore
from rlhf.dpo.logprobs import load_frozen_policy, summary_logprobs
from rlhf.eval.config import EvalConfig
from rlhf.eval.job import run_eval as run_eval_with
from rlhf.models import Policy


class ImplicitReward:
    """The ``PairScorer`` of a DPO policy and its reference: one score, so one head."""

    heads: RewardHeads = "single"

    def __init__(self, policy: Policy, reference: Policy, beta: float):
        self.policy, self.reference, self.beta = policy, reference, beta

    @torch.no_grad()
    def score(
        self, documents: list[str], summaries: list[str], score: RewardScore | None = "total"
    ) -> torch.Tensor:
        """Implicit rewards on the CPU: (B,), or (B, 1) for ``score=None`` (as ``RewardModel.score``)."""
        policy = summary_logprobs(self.policy.model, self.policy, documents, summaries)
        reference = summary_logprobs(self.reference.model, self.reference, documents, summaries)
        reward = (self.beta * (policy - reference)).float().cpu()  # (B,)
        return reward[:, None] if score is None else reward

    def select(self, per_head: torch.Tensor, score: RewardScore) -> torch.Tensor:
        """The one score, whichever kind is asked for."""
        return per_head[:, 0]


def load_implicit_reward(policy: ModelConfig, reference: ModelConfig, beta: float) -> ImplicitReward:
    """Both policies frozen, in eval mode without dropout, in their checkpoints' dtype."""
    return ImplicitReward(load_frozen_policy(policy), load_frozen_policy(reference), beta)


def run_eval(cfg: EvalConfig) -> dict:
    """jobs/eval.py: ``rlhf.eval.job.run_eval``, scoring comparisons by ``dpo_policy``'s implicit
    reward when it is set."""
    implicit = None
    if cfg.dpo_policy is not None and cfg.dpo_reference is not None:
        implicit = load_implicit_reward(cfg.dpo_policy, cfg.dpo_reference, cfg.dpo_beta)
    return run_eval_with(cfg, implicit)

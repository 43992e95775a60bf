"""The RL advantage estimators, one registry: ``ppo.advantage`` names an entry of ``ESTIMATORS``.

An entry is the function that turns a scored rollout into (rewards, advantages, returns) plus the
traits the rest of the system reads from it: the config's choices, default KL placement, group
check and ``--help``, and whether the learner loads a value model. The tensor math stays in the
pure functions of :mod:`rlhf.ppo.functional`; this module only wires them per estimator.
A new estimator is one entry in ``ESTIMATORS`` and its name in ``AdvantageKind`` above it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from rlhf.ppo import functional as F

if TYPE_CHECKING:
    from rlhf.ppo.config import PPOAlgoConfig

KLPlacement = Literal["reward", "loss"]


@dataclass(frozen=True)
class ScoredRollout:
    """What an estimator reads; rows are summaries, each document's k rows consecutive."""

    scores: torch.Tensor  # (B,) reward per summary, after normalisation and penalties
    logprobs: torch.Tensor | None  # (B, T) under the policy that sampled; None with ppo.single_update
    ref_logprobs: torch.Tensor  # (B, T) under the frozen reference
    values: torch.Tensor  # (B, T) the value model's; 0 without one
    mask: torch.Tensor  # (B, T) 1 on response tokens


class Estimate(NamedTuple):
    """An estimator's output, all (B, T) and 0 at padding; ``returns`` is 0 without a value model."""

    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


EstimateFn = Callable[[ScoredRollout, float, "PPOAlgoConfig"], Estimate]


@dataclass(frozen=True)
class Estimator:
    """One ``ppo.advantage`` choice: ``estimate(scored, reward_kl_coef, algo)`` and its traits.

    ``reward_kl_coef`` weighs the per-token KL penalty in the reward: 0 with ``ppo.kl_in=loss``.
    """

    estimate: EstimateFn
    uses_critic: bool  # the learner loads, trains and checkpoints a value model
    needs_groups: bool  # the baseline comes from the k samples of a document: k >= 2
    default_kl_in: KLPlacement  # where the KL goes unless ppo.kl_in is given
    description: str  # one line for --help


def shaped_rewards(
    scored: ScoredRollout, scores: torch.Tensor, kl_coef: float, algo: PPOAlgoConfig
) -> torch.Tensor:
    """``F.shape_rewards`` of ``scores`` (B,) with ``kl_coef`` times the per-token KL: (B, T).
    Without the policy's log-probs (``ppo.single_update``) the KL sits in the loss (kl_coef 0)."""
    if scored.logprobs is None:
        if kl_coef:
            raise ValueError("a KL penalty in the reward needs the rollout's log-probs")
        logprobs = scored.ref_logprobs  # the KL term is weighted 0
    else:
        logprobs = scored.logprobs
    return F.shape_rewards(scores, logprobs, scored.ref_logprobs, scored.mask, kl_coef, algo.kl_kind)


def gae(scored: ScoredRollout, kl_coef: float, algo: PPOAlgoConfig) -> Estimate:
    """PPO: GAE with the value model on KL-shaped per-token rewards, whitened if configured."""
    rewards = shaped_rewards(scored, scored.scores, kl_coef, algo)
    advantages, returns = F.compute_gae(rewards, scored.values, scored.mask, algo.gamma, algo.lam)
    if algo.whiten_advantages:
        advantages = F.masked_whiten(advantages, scored.mask)
    return Estimate(rewards, advantages, returns)


def group_relative(kind: F.GroupKind, scored: ScoredRollout, kl_coef: float, algo: PPOAlgoConfig) -> Estimate:
    """grpo / rloo: one advantage per summary from its whole shaped reward, on all its tokens.

    The shaped reward is the score minus ``kl_coef`` x its summed KL (TRL's RLOO): the advantage
    stays a sequence's, the group baseline also centres the KL, and with ``kl_in=loss`` (kl_coef 0)
    it is the score's.
    """
    rewards = shaped_rewards(scored, scored.scores, kl_coef, algo)
    advantages = F.group_advantages(rewards.sum(1), algo.samples_per_document, kind, algo.scale_by_std)
    spread = F.spread_over_tokens(advantages, scored.mask)
    return Estimate(rewards, spread, torch.zeros_like(spread))


def reinforce_pp(scored: ScoredRollout, kl_coef: float, algo: PPOAlgoConfig) -> Estimate:
    """REINFORCE++: the KL penalty stays per token (its returns-to-go, as OpenRLHF)."""
    k = algo.samples_per_document
    baselined = F.group_baseline(scored.scores, k) if k > 1 else scored.scores
    rewards = shaped_rewards(scored, baselined, kl_coef, algo)
    advantages = F.reinforce_pp_advantages(rewards, scored.mask, algo.gamma)
    return Estimate(rewards, advantages, torch.zeros_like(advantages))


# The registry. KL defaults: GRPO (Shao et al. 2024) in the loss; RLOO (Ahmadian et al. 2024, TRL)
# and REINFORCE++ (OpenRLHF) in the reward, like PPO. tests/ppo/test_estimators.py checks that
# AdvantageKind lists exactly the keys.
AdvantageKind = Literal["gae", "grpo", "rloo", "reinforce_pp"]
ESTIMATORS: dict[AdvantageKind, Estimator] = {
    "gae": Estimator(gae, uses_critic=True, needs_groups=False, default_kl_in="reward",
                     description="PPO: GAE on KL-shaped per-token rewards"),
    "grpo": Estimator(functools.partial(group_relative, "grpo"), uses_critic=False, needs_groups=True,
                      default_kl_in="loss", description="(r - group mean) / group std"),
    "rloo": Estimator(functools.partial(group_relative, "rloo"), uses_critic=False, needs_groups=True,
                      default_kl_in="reward", description="r - mean of the other k - 1"),
    "reinforce_pp": Estimator(reinforce_pp, uses_critic=False, needs_groups=False, default_kl_in="reward",
                              description="per-token returns-to-go, group mean subtracted when k >= 2, "
                                          "whitened over the batch"),
}


def estimators_help() -> str:
    """The ``ppo.advantage`` help: each estimator, whether it loads a value model, which need k >= 2."""
    entries = ", ".join(f"{name} ({e.description}; {'value model' if e.uses_critic else 'critic-free'})"
                        for name, e in ESTIMATORS.items())
    grouped = " and ".join(name for name, e in ESTIMATORS.items() if e.needs_groups)
    return (f"Advantage estimator: {entries}. Critic-free estimators load no value model; "
            f"{grouped} need samples_per_document >= 2.")


def kl_defaults_help() -> str:
    """Which estimators put the KL where unless ``ppo.kl_in`` is given, for its help."""
    by_placement: dict[str, list[str]] = {}
    for name, e in ESTIMATORS.items():
        by_placement.setdefault(e.default_kl_in, []).append(name)
    return "Unless given: " + "; ".join(f"{where} for {', '.join(names)}"
                                        for where, names in by_placement.items()) + "."

"""The DPO/IPO loss on sequence log-probs: a pure tensor function, no models, no sampling."""

from __future__ import annotations

from typing import Literal, get_args

import torch.nn.functional as nnf
from torch import Tensor

DPOKind = Literal["sigmoid", "ipo"]


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    kind: DPOKind = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation loss per pair; no reward model, no sampling.

    All inputs (B,): ``rlhf.models.logprobs.sequence_logprobs`` of the chosen / rejected response
    under the policy and the frozen reference. Returns ``(losses, chosen_rewards, rejected_rewards)``,
    all (B,); the caller averages the losses. With ``h = (pi_c - pi_r) - (ref_c - ref_r)``:
    "sigmoid" (Rafailov et al. 2023): ``-(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h)``,
    e = label_smoothing, the assumed share of flipped labels (cDPO), in [0, 0.5).
    "ipo" (Azar et al. 2023): ``(h - 1 / (2 beta))^2``, which stops pushing once the margin is
    reached, so it does not overfit deterministic preferences; label_smoothing must be 0.
    Rewards are the implicit ``beta * (pi - ref)``, detached metrics; only the policy inputs
    receive gradient.
    """
    if kind not in get_args(DPOKind):
        raise ValueError(f"unknown DPO kind {kind!r}; valid: {', '.join(get_args(DPOKind))}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind == "ipo" and label_smoothing != 0.0:
        raise ValueError("label_smoothing applies only to kind='sigmoid'; it must be 0 for 'ipo'")
    # The reference is frozen: detached so no gradient reaches it even if it was built with one.
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_ratio - rejected_ratio
    if kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * nnf.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * nnf.logsigmoid(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()

"""ODIN's regularisers (Chen et al. 2024): a reward model whose length lives in its own head.

Two linear heads on one pooled feature, quality and length; Bradley-Terry fits their sum (in
``rlhf.train.reward``), and these terms make the length head's score correlate with summary
length and the quality head's not, and keep the heads' weight vectors apart:

    L_length = |rho(r_quality, L)| - rho(r_length, L)      (Pearson rho over the batch)
    L_ortho  = |w_quality . w_length| / (|w_quality| |w_length|)

The paper writes the second as |W_Q^T W_L|; its authors' released code (RLHFlow
odin/gemma_two_head.py) normalises the weights first, which we follow: the raw dot product could
be met by shrinking both heads, which also shrinks the scores Bradley-Terry needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.eval.correlation import EPS, pearson


@dataclass
class LengthCorrelation:
    """The length term and the two correlations it is made of (for progress lines)."""

    loss: torch.Tensor
    rho_quality: torch.Tensor
    rho_length: torch.Tensor


def length_correlation_loss(
    quality: torch.Tensor, length_score: torch.Tensor, lengths: torch.Tensor
) -> LengthCorrelation:
    """|rho(quality, lengths)| - rho(length_score, lengths); all (N,) over every scored summary.

    Minimised when the quality score is uncorrelated with length and the length score follows it.
    """
    rho_quality = pearson(quality, lengths)
    rho_length = pearson(length_score, lengths)
    return LengthCorrelation(rho_quality.abs() - rho_length, rho_quality, rho_length)


def orthogonality_loss(w_quality: torch.Tensor, w_length: torch.Tensor) -> torch.Tensor:
    """|cos| of the angle between the two heads' weight vectors (H,): 0 when orthogonal."""
    norms = (w_quality.pow(2).sum() * w_length.pow(2).sum() + EPS).sqrt()
    return (w_quality * w_length).sum().abs() / norms

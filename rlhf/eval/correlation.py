"""Pearson correlation, differentiable: the eval report's length correlations, and the same
number ODIN's training terms (``rlhf.train.disentangle``) push up or down."""

from __future__ import annotations

import torch

EPS = 1e-12  # keeps rho defined (and 0) when one side is constant: one length, one score


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two (N,) tensors, a 0-dim tensor; 0 when either is constant."""
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / ((xc**2).sum() * (yc**2).sum() + EPS).sqrt()

"""Health numbers of a reward model and of a policy's summaries, as pure functions: what the online
loop records each cycle (calibration, drift on a fixed probe) and what its publish guard compares
between two policy versions (length, repetition, summaries that never end)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf.eval.correlation import pearson


def calibration_error(probabilities: Sequence[float], outcomes: Sequence[int], bins: int) -> float:
    """Expected calibration error of predicted preference probabilities, in [0, 1].

    ``probabilities[i]`` = P(summary_1 preferred) = σ(r_1 − r_0), ``outcomes[i]`` the choice (1:
    summary_1 won). The probabilities fall into ``bins`` equal-width bins on [0, 1] (1.0 in the
    last); ECE = Σ_b n_b / N · |mean p_b − mean outcome_b|. Swapping a pair's order maps p to 1 − p
    and its outcome to 1 − outcome, a mirrored bin with the same gap, so the order shown does not
    matter. 0.0 for no pairs.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    gaps = [0.0] * bins  # Σ (p − outcome) per bin
    for p, outcome in zip(probabilities, outcomes, strict=True):
        gaps[min(int(p * bins), bins - 1)] += p - outcome
    return sum(abs(gap) for gap in gaps) / max(len(probabilities), 1)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span ([5, 1, 5] -> [2.5, 1, 2.5])."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); 0.0 when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    rx = torch.tensor(average_ranks(x), dtype=torch.float64)
    ry = torch.tensor(average_ranks(y), dtype=torch.float64)
    return pearson(rx, ry).item()


def score_drift(before: Sequence[float], after: Sequence[float]) -> float:
    """1 − Spearman correlation of two reward models' scores on the same probe pairs, in [0, 2]:
    0 = the same order, 1 = unrelated, 2 = reversed.

    Rank-based on purpose: Bradley–Terry training fixes scores only up to a shift and its scale
    grows with training, and PPO whitens advantages, so what changes the policy's target is the
    order a reward model puts summaries in; ranks ignore any monotone rescaling, and one outlier
    score cannot dominate them. A constant side has no order: drift 1.
    """
    return 1.0 - spearman(before, after)


def repetition(text: str, n: int) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier one (1 − distinct / total), in
    [0, 1); 0.0 with fewer than ``n`` words. "a b a b a b" with n=2: 5 bigrams, 2 distinct -> 0.6."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_repetition(texts: Sequence[str], n: int) -> float:
    """Mean ``repetition`` over summaries; 0.0 for none."""
    return sum(repetition(text, n) for text in texts) / max(len(texts), 1)


def unfinished_share(ended: Sequence[bool]) -> float:
    """Share of summaries that never emitted eos (they stopped at max_new_tokens); 0.0 for none."""
    return sum(not e for e in ended) / max(len(ended), 1)

"""Active pair selection's math: which candidate pair the reward model is least sure about.

Pure Python (no torch, no Ray) so the rule is tested against hand-computed values.

The rule is the Bradley-Terry margin |σ(r_0 − r_1) − ½| of one reward model rather than the
disagreement of an ensemble of heads: it needs no change to reward training and one scoring pass
of the model the online loop already publishes. An ensemble would measure epistemic uncertainty
(what more labels can fix) and pass over pairs that are merely noisy; the margin cannot tell the
two apart, so a person whose choices are noisy can draw it to pairs no label settles.
benchmarks/active_selection.py measures what the margin buys over random pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def preference_margin(score_0: float, score_1: float) -> float:
    """|σ(r_0 − r_1) − ½| in [0, ½): 0 when the model thinks either summary as likely preferred,
    near ½ when it is sure of one. Computed as ½·tanh(|r_0 − r_1| / 2), the same value with no
    overflow for large score gaps."""
    return 0.5 * math.tanh(abs(score_0 - score_1) / 2)


def least_certain(scores: Sequence[tuple[float, float]]) -> int:
    """Index of the pair (r_0, r_1) with the smallest ``preference_margin``; the first on a tie."""
    if not scores:
        raise ValueError("least_certain needs at least one scored pair")
    margins = [preference_margin(r0, r1) for r0, r1 in scores]
    return margins.index(min(margins))

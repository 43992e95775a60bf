"""Preference rows a reward model or DPO learns in a few steps."""

from __future__ import annotations

import json
import random
from pathlib import Path


def easy_preferences(path: Path, n: int) -> Path:
    """Chosen summaries are plain words, rejected ones are symbol noise: trivially separable."""
    rng = random.Random(0)
    words = ["cat", "dog", "rent", "job", "car", "friend", "money", "school"]
    with path.open("w") as f:
        for i in range(n):
            good = " ".join(rng.choice(words) for _ in range(6))
            bad = "".join(rng.choice("#$%&*@!?") for _ in range(24))
            choice = i % 2
            pair = [bad, bad]
            pair[choice] = good
            f.write(json.dumps({"original_text": f"post {i} about {good}",
                                "summary_0": pair[0], "summary_1": pair[1], "choice": choice}) + "\n")
    return path

"""Evaluation of reward models (pairwise accuracy beside length baselines) and policies."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pyarrow as pa
import torch

from rlhf.eval.rouge import rouge
from rlhf.metrics import emit
from rlhf.models import Policy, RewardModel

SIMILAR_LENGTH = 0.2  # pairs whose lengths differ by less than this share are "similar length"


def _batches(table: pa.Table, size: int, label: str) -> Iterator[dict[str, list]]:
    """Row batches with a progress line, since scoring thousands of pairs takes minutes on CPU."""
    start, n = time.time(), table.num_rows
    for offset in range(0, n, size):
        yield table.slice(offset, size).to_pydict()
        done = min(offset + size, n)
        rate = done / max(time.time() - start, 1e-9)
        emit(f"{label}: {done}/{n} rows | {rate:.1f} rows/s")


def length_baseline(lengths_0: list[int], lengths_1: list[int], choices: list[int]) -> float:
    """Accuracy of "the longer summary wins"; a tie counts as a coin flip (0.5)."""
    credit = 0.0
    for l0, l1, choice in zip(lengths_0, lengths_1, choices):
        credit += 0.5 if l0 == l1 else float((l1 > l0) == bool(choice))
    return credit / max(len(choices), 1)


def is_similar_length(l0: int, l1: int) -> bool:
    return abs(l0 - l1) < SIMILAR_LENGTH * max(l0, l1, 1)


def evaluate_reward_model(model: RewardModel, comparisons: pa.Table, batch_size: int) -> dict:
    """Pairwise accuracy of ``model`` on canonical preference rows, beside the length baseline.

    Lengths are in characters. ``similar_length_*`` restricts to pairs whose lengths differ by
    less than 20%, where length cannot explain a preference.
    """
    correct: list[bool] = []
    for rows in _batches(comparisons, batch_size, "reward eval"):
        s0 = model.score(rows["original_text"], rows["summary_0"])  # (B,)
        s1 = model.score(rows["original_text"], rows["summary_1"])  # (B,)
        correct += [bool(c) == bool(b) for c, b in zip(rows["choice"], (s1 > s0).tolist())]
    l0 = [len(s) for s in comparisons.column("summary_0").to_pylist()]
    l1 = [len(s) for s in comparisons.column("summary_1").to_pylist()]
    choices = comparisons.column("choice").to_pylist()
    similar = [i for i in range(len(choices)) if is_similar_length(l0[i], l1[i])]
    return {
        "rows": len(choices),
        "accuracy": sum(correct) / max(len(correct), 1),
        "length_baseline_accuracy": length_baseline(l0, l1, choices),
        "similar_length_rows": len(similar),
        "similar_length_accuracy": sum(correct[i] for i in similar) / max(len(similar), 1),
        "similar_length_baseline_accuracy": length_baseline(
            [l0[i] for i in similar], [l1[i] for i in similar], [choices[i] for i in similar]
        ),
    }


def evaluate_policy(
    policy: Policy, pairs: pa.Table, batch_size: int, reward_model: RewardModel | None = None
) -> dict:
    """ROUGE against references, mean summary length, and mean reward under ``reward_model``.

    Summaries are greedy decodes, so the numbers are reproducible run to run.
    """
    predictions, references, rewards = [], [], []
    for rows in _batches(pairs, batch_size, "policy eval"):
        summaries = policy.generate(rows["original_text"], do_sample=False)
        predictions += summaries
        references += rows["summary"]
        if reward_model is not None:
            rewards += reward_model.score(rows["original_text"], summaries).tolist()
    result = {
        "rows": len(predictions),
        **rouge(predictions, references),
        "summary_words_mean": sum(len(p.split()) for p in predictions) / max(len(predictions), 1),
        "reference_words_mean": sum(len(r.split()) for r in references) / max(len(references), 1),
    }
    if reward_model is not None:
        raw = torch.tensor(rewards)
        result["reward_mean"] = raw.mean().item()
        result["reward_normalized_mean"] = reward_model.normalize(raw).mean().item()
    return result

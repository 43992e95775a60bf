"""Evaluation of reward models (pairwise accuracy beside length baselines) and policies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa
import torch

from rlhf.config.sections import RewardHead, RewardHeads, RewardScore
from rlhf.eval.correlation import pearson
from rlhf.eval.health import calibration_error
from rlhf.eval.rouge import rouge
from rlhf.metrics import emit
from rlhf.models import Policy, RewardModel

SIMILAR_LENGTH = 0.2  # pairs whose lengths differ by less than this share are "similar length"
SIMILAR_LENGTHS = (0.1, 0.2)  # the shares reported as similar_length_10_*, similar_length_20_*
CALIBRATION_BINS = 10  # equal-width bins of σ(r_1 − r_0) behind calibration_error


class PairScorer(Protocol):
    """What the comparison accuracy reads: a ``RewardModel``, or a DPO policy's implicit reward
    (``rlhf.models.scoring.ImplicitReward``), so both are judged by the same bookkeeping."""

    heads: RewardHeads

    def score(self, documents: list[str], summaries: list[str], score: RewardScore | None) -> torch.Tensor:
        """Raw scores on the CPU: (B,) of kind ``score``, or every head's (B, n) for None."""

    def select(self, per_head: torch.Tensor, score: RewardScore) -> torch.Tensor:
        """(B,) scores of kind ``score`` from per-head scores (B, n)."""


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


def is_similar_length(l0: int, l1: int, share: float = SIMILAR_LENGTH) -> bool:
    """Lengths differ by less than ``share`` of the longer one."""
    return abs(l0 - l1) < share * max(l0, l1, 1)


def similar_length_metrics(
    share: float, name: str, lengths_0: list[int], lengths_1: list[int], choices: list[int],
    correct: list[bool],
) -> dict[str, float]:
    """``name``_rows, _accuracy (of the model) and _baseline_accuracy (the longer wins) on the pairs
    within ``share`` of each other's length, where length can barely explain a preference."""
    similar = [i for i in range(len(choices)) if is_similar_length(lengths_0[i], lengths_1[i], share)]
    return {
        f"{name}_rows": len(similar),
        f"{name}_accuracy": sum(correct[i] for i in similar) / max(len(similar), 1),
        f"{name}_baseline_accuracy": length_baseline(
            [lengths_0[i] for i in similar], [lengths_1[i] for i in similar], [choices[i] for i in similar]
        ),
    }


def length_correlations(
    model: PairScorer, per_head: torch.Tensor, lengths: list[int], score: RewardHead
) -> dict[str, float]:
    """Pearson correlation of scores with summary length over every scored summary:
    ``length_correlation`` for ``score``, and per kind (quality, length, total) for two heads.

    per_head: (N, n) raw scores of the N summaries whose lengths are ``lengths``.
    """
    length = torch.tensor(lengths, dtype=torch.float64)
    rho = {"": pearson(model.select(per_head, score).double(), length).item()}
    if model.heads == "disentangled":
        for kind in ("quality", "length", "total"):
            rho[f"_{kind}"] = pearson(model.select(per_head, kind).double(), length).item()
    return {f"length_correlation{suffix}": value for suffix, value in rho.items()}


def evaluate_reward_model(
    model: PairScorer, comparisons: pa.Table, batch_size: int, score: RewardHead = "quality",
    calibration_bins: int = CALIBRATION_BINS,
) -> dict:
    """Pairwise accuracy of ``model``'s ``score`` on canonical preference rows, beside the length
    baseline, on all pairs and on pairs of similar length; how much the scores follow length; and
    ``calibration_error``: the ECE of σ(r_1 − r_0) as P(summary_1 wins) (``rlhf.eval.health``).

    Lengths are in characters. ``similar_length_*`` (kept for the tools that read it) equals
    ``similar_length_20_*``: pairs whose lengths differ by less than 20%.
    """
    h0, h1 = [], []
    for rows in _batches(comparisons, batch_size, "reward eval"):
        h0.append(model.score(rows["original_text"], rows["summary_0"], None))  # (B, n)
        h1.append(model.score(rows["original_text"], rows["summary_1"], None))  # (B, n)
    per_head_0, per_head_1 = torch.cat(h0), torch.cat(h1)  # (N, n)
    s0, s1 = model.select(per_head_0, score), model.select(per_head_1, score)  # (N,)
    choices = comparisons.column("choice").to_pylist()
    correct = [bool(c) == b for c, b in zip(choices, (s1 > s0).tolist())]
    l0 = [len(s) for s in comparisons.column("summary_0").to_pylist()]
    l1 = [len(s) for s in comparisons.column("summary_1").to_pylist()]
    similar = {"similar_length": SIMILAR_LENGTH,
               **{f"similar_length_{round(share * 100)}": share for share in SIMILAR_LENGTHS}}
    return {
        "rows": len(choices),
        "accuracy": sum(correct) / max(len(correct), 1),
        "calibration_error": calibration_error(torch.sigmoid(s1 - s0).tolist(), choices, calibration_bins),
        "length_baseline_accuracy": length_baseline(l0, l1, choices),
        **{key: value for name, share in similar.items()
           for key, value in similar_length_metrics(share, name, l0, l1, choices, correct).items()},
        **length_correlations(model, torch.cat([per_head_0, per_head_1]), l0 + l1, score),
    }


def evaluate_policy(
    policy: Policy, pairs: pa.Table, batch_size: int, reward_model: RewardModel | None = None,
    score: RewardHead = "quality",
) -> tuple[dict, list[dict]]:
    """ROUGE against references, mean summary length, and mean reward (``score``) under
    ``reward_model``; and every row as {document, reference, summary, reward?}, to read side by side.

    Summaries are greedy decodes, so the numbers are reproducible run to run.
    """
    documents, predictions, references, rewards = [], [], [], []
    for rows in _batches(pairs, batch_size, "policy eval"):
        summaries = policy.generate(rows["original_text"], do_sample=False)
        documents += rows["original_text"]
        predictions += summaries
        references += rows["summary"]
        if reward_model is not None:
            rewards += reward_model.score(rows["original_text"], summaries, score).tolist()
    result = {
        "rows": len(predictions),
        **rouge(predictions, references),
        "summary_words_mean": sum(len(p.split()) for p in predictions) / max(len(predictions), 1),
        "reference_words_mean": sum(len(r.split()) for r in references) / max(len(references), 1),
    }
    if reward_model is not None:
        raw = torch.tensor(rewards)
        result["reward_mean"] = raw.mean().item()
        result["reward_normalized_mean"] = reward_model.normalize(raw, score).mean().item()
    summary_rows: list[dict[str, Any]] = [{"document": d, "reference": r, "summary": p}
                                          for d, r, p in zip(documents, references, predictions)]
    for row, reward in zip(summary_rows, rewards):
        row["reward"] = reward
    return result, summary_rows

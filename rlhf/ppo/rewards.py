"""Built-in rule-based rewards for `reward.fn`; each is ``fn(documents, summaries) -> scores``."""

from __future__ import annotations


def brevity(documents: list[str], summaries: list[str]) -> list[float]:
    """Minus the summary length in characters / 20: a known target for smoke tests and demos
    (a policy learns it by ending summaries earlier)."""
    return [-len(summary) / 20 for summary in summaries]


def document_overlap(documents: list[str], summaries: list[str]) -> list[float]:
    """Share of summary words found in the document: a cheap faithfulness proxy (0 to 1)."""
    scores = []
    for document, summary in zip(documents, summaries):
        words = summary.lower().split()
        vocabulary = set(document.lower().split())
        scores.append(sum(w in vocabulary for w in words) / len(words) if words else 0.0)
    return scores

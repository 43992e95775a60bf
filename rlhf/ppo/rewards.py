"""Built-in rule-based rewards for `reward.fn`; each is ``fn(documents, summaries) -> scores``."""

from __future__ import annotations


def brevity(documents: list[str], summaries: list[str]) -> list[float]:
    """Minus the summary length in words, in tens: a known target for smoke tests and demos."""
    return [-len(summary.split()) / 10 for summary in summaries]


def document_overlap(documents: list[str], summaries: list[str]) -> list[float]:
    """Share of summary words found in the document: a cheap faithfulness proxy (0 to 1)."""
    scores = []
    for document, summary in zip(documents, summaries):
        words = summary.lower().split()
        vocabulary = set(document.lower().split())
        scores.append(sum(w in vocabulary for w in words) / len(words) if words else 0.0)
    return scores

"""Synthetic preference pairs for reward training: a reference summary beats a corrupted copy.

Each corruption breaks one property a good summary has (faithful to *this* document, complete,
coherent, non-repetitive, fluent), so the reward model learns those properties from cheap data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import pyarrow as pa

from rlhf.data.schemas import PREFERENCE_SCHEMA

Corruption = Callable[[str, random.Random, Sequence[str]], str]
CorruptionKind = Literal["other_summary", "truncate", "shuffle", "repeat_tail", "random_tokens"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def other_summary(summary: str, rng: random.Random, pool: Sequence[str]) -> str:
    """Another document's summary: fluent but unfaithful to this document."""
    candidates = [s for s in pool if s.strip() != summary.strip()]
    if not candidates:
        raise ValueError("other_summary needs at least two distinct summaries in the pool")
    return rng.choice(candidates)


def truncate(summary: str, rng: random.Random, pool: Sequence[str]) -> str:
    """The first 30-70% of the words: incomplete."""
    words = summary.split()
    keep = max(1, min(len(words) - 1, int(len(words) * rng.uniform(0.3, 0.7))))
    return " ".join(words[:keep])


def shuffle(summary: str, rng: random.Random, pool: Sequence[str]) -> str:
    """Sentences in a new order (word chunks for a one-sentence summary): incoherent."""
    parts = _sentences(summary)
    if len(parts) < 2:
        words = summary.split()
        size = max(1, len(words) // 3)
        parts = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    original = list(parts)
    for _ in range(10):
        rng.shuffle(parts)
        if parts != original:
            break
    else:
        parts = parts[1:] + parts[:1]
    return " ".join(parts)


def repeat_tail(summary: str, rng: random.Random, pool: Sequence[str]) -> str:
    """The last sentence (or last few words) repeated 2-3 times: degenerate generation."""
    parts = _sentences(summary)
    tail = parts[-1] if len(parts) > 1 else " ".join(summary.split()[-4:])
    return summary.rstrip() + (" " + tail) * rng.randint(2, 3)


def random_tokens(summary: str, rng: random.Random, pool: Sequence[str]) -> str:
    """About a third of the words swapped for random words from other summaries: disfluent."""
    vocabulary = [w for s in pool for w in s.split()] or ["lorem"]
    words = summary.split()
    n_swap = max(1, len(words) // 3)
    for i in rng.sample(range(len(words)), min(n_swap, len(words))):
        words[i] = rng.choice(vocabulary)
    return " ".join(words)


CORRUPTIONS: dict[CorruptionKind, Corruption] = {
    "other_summary": other_summary,
    "truncate": truncate,
    "shuffle": shuffle,
    "repeat_tail": repeat_tail,
    "random_tokens": random_tokens,
}
assert tuple(CORRUPTIONS) == get_args(CorruptionKind)


def synthetic_preferences(
    sft: pa.Table, n_pairs: int, kinds: Sequence[CorruptionKind], seed: int
) -> pa.Table:
    """``n_pairs`` preference rows from SFT rows (original_text, summary).

    The reference is placed at a random index so the model cannot learn a position bias;
    ``source`` records the corruption (``synthetic:truncate``) for per-kind analysis.
    """
    unknown = [k for k in kinds if k not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption {unknown}; choose from {', '.join(CORRUPTIONS)}")
    if sft.num_rows == 0 or n_pairs == 0:
        return _preference_table([])
    rng = random.Random(seed)
    documents = sft.column("original_text").to_pylist()
    summaries = sft.column("summary").to_pylist()
    rows: list[tuple[str, str, str, int, str]] = []
    while len(rows) < n_pairs:
        i = rng.randrange(len(documents))
        kind = kinds[len(rows) % len(kinds)]
        corrupted = CORRUPTIONS[kind](summaries[i], rng, summaries)
        if corrupted.strip() == summaries[i].strip():
            continue
        choice = rng.randint(0, 1)
        pair = [corrupted, corrupted]
        pair[choice] = summaries[i]
        rows.append((documents[i], pair[0], pair[1], choice, f"synthetic:{kind}"))
    return _preference_table(rows)


def _preference_table(rows: list[tuple[str, str, str, int, str]]) -> pa.Table:
    names = ("original_text", "summary_0", "summary_1", "choice", "source")
    return pa.Table.from_pylist([dict(zip(names, row)) for row in rows], schema=PREFERENCE_SCHEMA)

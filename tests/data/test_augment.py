"""Each corruption breaks its summary in the stated way; the mixed table is canonical."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from rlhf.data.augment import (
    CORRUPTIONS,
    other_summary,
    random_tokens,
    repeat_tail,
    shuffle,
    synthetic_preferences,
    truncate,
)
from rlhf.data.schemas import PREFERENCE_SCHEMA

SUMMARY = "The landlord kept my deposit. I sent two letters. Now I am going to small claims court."
POOL = [SUMMARY, "My cat hates the new dog.", "I failed my driving test twice and feel awful."]


def test_other_summary_is_another_documents_summary() -> None:
    out = other_summary(SUMMARY, random.Random(0), POOL)
    assert out in POOL[1:]


def test_truncate_keeps_a_strict_prefix_of_30_to_70_percent() -> None:
    words = SUMMARY.split()
    for seed in range(20):
        out = truncate(SUMMARY, random.Random(seed), POOL).split()
        assert out == words[: len(out)]
        assert 0.3 * len(words) - 1 <= len(out) <= 0.7 * len(words)


def test_shuffle_reorders_the_same_sentences() -> None:
    out = shuffle(SUMMARY, random.Random(1), POOL)
    assert out != SUMMARY
    assert sorted(out.replace(".", "").split()) == sorted(SUMMARY.replace(".", "").split())


def test_shuffle_of_a_single_sentence_moves_word_chunks() -> None:
    single = "my roommate never pays rent on time and i am tired of it"
    out = shuffle(single, random.Random(0), POOL)
    assert out != single and sorted(out.split()) == sorted(single.split())


def test_repeat_tail_repeats_the_last_sentence() -> None:
    out = repeat_tail(SUMMARY, random.Random(0), POOL)
    tail = "Now I am going to small claims court."
    assert out.startswith(SUMMARY)
    assert out.count(tail) in (3, 4)


def test_random_tokens_swaps_about_a_third_of_the_words() -> None:
    out = random_tokens(SUMMARY, random.Random(0), POOL).split()
    words = SUMMARY.split()
    assert len(out) == len(words)
    changed = sum(a != b for a, b in zip(out, words))
    assert 1 <= changed <= len(words) // 3
    vocabulary = {w for s in POOL for w in s.split()}
    assert set(out) <= vocabulary


def test_synthetic_preferences_prefer_the_reference_at_random_positions() -> None:
    sft = pa.table({"original_text": [f"document {i}" for i in range(3)], "summary": POOL})
    table = synthetic_preferences(sft, 50, list(CORRUPTIONS), seed=3)
    assert table.schema.equals(PREFERENCE_SCHEMA)
    assert table.num_rows == 50
    rows = table.to_pylist()
    by_doc = dict(zip(sft.column("original_text").to_pylist(), POOL))
    for row in rows:
        preferred = row["summary_1"] if row["choice"] else row["summary_0"]
        other = row["summary_0"] if row["choice"] else row["summary_1"]
        assert preferred == by_doc[row["original_text"]]
        assert other != preferred
    assert {r["choice"] for r in rows} == {0, 1}
    assert {r["source"] for r in rows} == {f"synthetic:{k}" for k in CORRUPTIONS}
    assert synthetic_preferences(sft, 50, list(CORRUPTIONS), seed=3).equals(table)


def test_unknown_corruption_is_refused() -> None:
    sft = pa.table({"original_text": ["d"], "summary": ["s t u"]})
    with pytest.raises(ValueError, match="unknown corruption"):
        synthetic_preferences(sft, 1, ["blur"], seed=0)

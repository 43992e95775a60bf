"""The publish guard on a real store and registry, without Ray: a cycle whose new policy only writes
longer summaries is refused (ledger says why, the served version stays current), the same policy
passes with a looser tolerance, and the human win-rate check counts decided comparisons only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from support.online import label_choices, online_config

from rlhf.config.core import load_config
from rlhf.models.policy import Policy
from rlhf.models.tiny import build_tiny_lm
from rlhf.models.tokenizer import load_tokenizer
from rlhf.online.config import OnlineConfig
from rlhf.online.guard import refusals, win_count
from rlhf.online.loop import OnlineLoop
from rlhf.registry import PolicyRegistry
from rlhf.store import CycleLog, CycleRecord, FeedbackStore, SummaryStats
from rlhf.store.queries import Tally
from rlhf.store.tables import utcnow

MAX_NEW_TOKENS = 24


def _policy_writing(min_new_tokens: int) -> Policy:
    """A tiny policy whose greedy summaries are exactly ``min_new_tokens`` printable tokens and then eos:
    eos is banned before ``min_new_tokens`` and wins by a wide margin after."""
    model, tokenizer = build_tiny_lm("tiny-t5", 1), load_tokenizer("tiny-t5")
    printable = {tokenizer.convert_tokens_to_ids(chr(b)) for b in range(32, 127)}
    config = model.generation_config
    config.suppress_tokens = [i for i in range(model.config.vocab_size)
                              if i not in printable and i != tokenizer.eos_token_id]
    config.sequence_bias = [[[tokenizer.eos_token_id], 50.0]]
    config.min_new_tokens = min_new_tokens
    return Policy(model, tokenizer, 256, 32)


def _cycle_ready_to_publish(loop: OnlineLoop, number: int, candidate: Path) -> None:
    """Ledger a DPO cycle whose update was kept, as a killed job leaves it before publishing."""
    loop.output_dir.mkdir(parents=True, exist_ok=True)
    record = CycleRecord(watermark_since=None, watermark_until=utcnow().isoformat(),
                         policy_before=loop.context.current_policy())
    loop.ledger.start(number, None, utcnow(), record)
    kept = dataclasses.replace(record, dpo_judged=False, dpo_kept=True, dpo_policy=str(candidate))
    loop.ledger.advance(number, "reward_done", kept)


def test_a_policy_that_only_writes_longer_summaries_is_not_published(tmp_path: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    registry.publish(_policy_writing(2).save, {"iteration": 1})
    longer = tmp_path / "longer"
    _policy_writing(16).save(longer)
    settings = ("method=dpo", f"rl.ppo.max_new_tokens={MAX_NEW_TOKENS}", "guard.documents=4")
    cfg = online_config(tmp_path, *settings)
    store = FeedbackStore(cfg.store.url)
    label_choices(store, 6)
    loop = OnlineLoop(cfg)
    _cycle_ready_to_publish(loop, 1, longer)
    (refused,) = loop.run()

    guard = refused.record.guard
    assert refused.done and refused.record.policy_version is None and refused.record.candidate == str(longer)
    assert (guard.documents, guard.before, guard.after) == (
        4, SummaryStats(2.0, 0.0, 0.0), SummaryStats(16.0, 0.0, 0.0))  # longer; as repetitive, as finished
    assert len(guard.refused) == 1 and guard.refused[0].startswith(
        "guard.max_length_ratio: mean summary length grew from 2.0 to 16.0 tokens (x8.00 > x1.5)")
    assert (guard.win_rate, guard.win_comparisons) == (None, 0)  # _label's pairs are v0001 against itself
    assert CycleLog(store).all()[0].record == refused.record  # the reason is in the ledger
    assert registry.versions() == ["v0001"] and registry.current().name == "v0001"

    lenient = online_config(tmp_path, *settings, "cycles=2", "guard.max_length_ratio=10")
    loop = OnlineLoop(lenient)
    _cycle_ready_to_publish(loop, 2, longer)
    (published,) = loop.run()
    assert published.record.guard.refused == [] and published.record.policy_version == "v0002"
    assert registry.current().name == "v0002" and registry.metrics("v0002")["cycle"] == 2
    store.close()


def test_the_win_rate_check_counts_decided_comparisons_against_other_versions(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path}/feedback.db")
    document = store.add_document("a post about the weather")
    # (versions shown, the choice or None): v0002 wins 1 of 3 decided comparisons against v0001
    shown = [(("v0002", "v0001"), 0), (("v0001", "v0002"), 0), (("v0002", "v0001"), 1),
             (("v0001", "v0002"), None), (("v0002", "v0002"), 0)]  # pending; the same version twice
    for k, (versions, choice) in enumerate(shown):
        comparison = store.create_comparison(document, f"summary {k}a", f"summary {k}b", *versions)
        if choice is not None:
            store.record_choice(comparison, choice)
    assert win_count(store, "v0002") == Tally(hits=1, total=3)
    assert win_count(store, "v0001") == Tally(hits=2, total=3)
    assert win_count(store, None) == Tally(0, 0)
    store.close()

    same = SummaryStats(10.0, 0.1, 0.0)
    guard = load_config(OnlineConfig, None, ["guard.min_win_rate=0.4", "guard.min_win_comparisons=3"]).guard
    (reason,) = refusals(same, same, Tally(1, 3), guard)
    assert reason.startswith("guard.min_win_rate: people preferred the served version in 1 of 3")
    assert refusals(same, same, Tally(2, 3), guard) == []
    few = dataclasses.replace(guard, min_win_comparisons=4)
    assert refusals(same, same, Tally(0, 3), few) == []  # not enough comparisons to judge


@pytest.mark.parametrize(("after", "key"), [
    (SummaryStats(10.0, 0.25, 0.0), "guard.max_repetition_increase"),
    (SummaryStats(10.0, 0.1, 0.5), "guard.max_unfinished_increase"),
])
def test_more_repetition_or_unfinished_summaries_are_refused(after: SummaryStats, key: str) -> None:
    guard = load_config(OnlineConfig, None, []).guard  # the documented defaults
    (reason,) = refusals(SummaryStats(10.0, 0.1, 0.0), after, Tally(0, 0), guard)
    assert reason.startswith(key)

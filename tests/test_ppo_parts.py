"""PPO pieces around the math: prompt cursor, EOS penalty, reward functions, policy registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.errors import InputError
from rlhf.metrics import IterationMetrics
from rlhf.ppo.rewards import brevity, document_overlap, load_reward_fn
from rlhf.ppo.trainer import PromptStream, apply_no_eos_penalty
from rlhf.registry import PolicyRegistry


def _stream() -> PromptStream:
    docs = [f"doc{i}" for i in range(5)]

    def epoch_documents(epoch: int):
        order = torch.randperm(5, generator=torch.Generator().manual_seed(epoch)).tolist()
        return iter([docs[i] for i in order])

    return PromptStream(epoch_documents)


def test_prompt_stream_wraps_epochs_and_resumes_at_its_cursor() -> None:
    stream = _stream()
    first = stream.next_batch(3) + stream.next_batch(3)  # crosses into epoch 1
    assert stream.state() == {"epoch": 1, "position": 1}
    assert sorted(first[:5]) == [f"doc{i}" for i in range(5)]
    later = stream.next_batch(4)
    resumed = _stream()
    resumed.seek(1, 1)
    assert resumed.next_batch(4) == later


def test_empty_prompt_stream_is_an_error() -> None:
    with pytest.raises(ValueError, match="no documents"):
        PromptStream(lambda epoch: iter([])).next_batch(1)


def test_no_eos_penalty_replaces_only_unfinished_summaries() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    assert apply_no_eos_penalty(scores, ended, -1.0).tolist() == [1.0, -1.0, 3.0]
    assert apply_no_eos_penalty(scores, ended, None) is scores


def test_builtin_rewards() -> None:
    assert brevity(["d", "d"], ["one two three", ""]) == [-0.65, 0.0]
    assert document_overlap(["the cat sat"], ["The cat ran"]) == [pytest.approx(2 / 3)]


def test_reward_fn_from_module_and_file(tmp_path: Path) -> None:
    assert load_reward_fn("rlhf.ppo.rewards:brevity") is brevity
    f = tmp_path / "my_reward.py"
    f.write_text("def score(documents, summaries):\n    return [float(len(s)) for s in summaries]\n")
    assert load_reward_fn(f"{f}:score")(["d"], ["abc"]) == [3.0]
    cases = [("nocolon", "must look like"), ("rlhf.nope:f", "cannot import"),
             ("rlhf.ppo.rewards:nothing", "has no function"), (f"{tmp_path}/x.py:f", "not found")]
    for bad, fragment in cases:
        with pytest.raises(InputError, match=fragment):
            load_reward_fn(bad)


def test_registry_publishes_numbered_complete_versions(tmp_path: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    assert registry.latest() is None
    for i in range(2):
        registry.publish(lambda folder, i=i: (folder / "weights.txt").write_text(str(i)), {"iteration": i})
    (tmp_path / "registry" / ".staging-v0003-1").mkdir()  # a crashed, incomplete publish
    assert registry.versions() == ["v0001", "v0002"]
    latest = registry.latest()
    assert latest.name == "v0002" and (latest / "weights.txt").read_text() == "1"
    assert json.loads((latest / "metrics.json").read_text()) == {"iteration": 1}


# The metrics.jsonl keys of a PPO iteration; the first two lines are what the shared design requires.
ITERATION_KEYS = {
    "iteration", "reward_mean", "kl_mean", "response_length_mean", "time_s",
    "time_generate_s", "time_score_s", "time_reference_s", "time_learn_s", "time_sync_s",
    "reward_used_mean", "kl_coef", "policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl",
    "explained_variance", "eos_fraction", "generate_tokens_per_s", "sync_transfer_s",
}


def test_iteration_metrics_round_trip_through_a_record_with_exactly_the_documented_keys() -> None:
    values = {key: i + 0.5 for i, key in enumerate(sorted(ITERATION_KEYS))}
    metrics = IterationMetrics(**{**values, "iteration": 3})
    record = json.loads(json.dumps(metrics.to_record()))
    assert set(record) == ITERATION_KEYS and set(IterationMetrics.keys()) == ITERATION_KEYS
    assert IterationMetrics.from_record(record) == metrics
    with pytest.raises(TypeError):  # a key lost or renamed is an error, not a default
        IterationMetrics.from_record({k: v for k, v in record.items() if k != "kl_mean"})

"""PPO pieces around the math: prompt cursor, EOS penalty, reward functions, policy registry,
the roles' chunked forward passes (``roles.forward_batch_size``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.config.core import ConfigError, load_config
from rlhf.errors import InputError
from rlhf.metrics import IterationMetrics
from rlhf.ppo import experience as experience_module
from rlhf.ppo import roles as roles_module
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.experience import response_mask
from rlhf.ppo.functional import kl_penalty
from rlhf.ppo.rewards import brevity, document_overlap, load_reward_fn
from rlhf.ppo.roles import LocalRoles, forward_chunks
from rlhf.ppo.trainer import TRAINER_STATE, PPOTrainer, PromptStream, apply_no_eos_penalty, build_batch
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
    "explained_variance", "eos_fraction", "generate_tokens_per_s", "rollout_lag", "sync_transfer_s",
    "sync_bytes",
}


def test_iteration_metrics_round_trip_through_a_record_with_exactly_the_documented_keys() -> None:
    values = {key: i + 0.5 for i, key in enumerate(sorted(ITERATION_KEYS))}
    metrics = IterationMetrics(**{**values, "iteration": 3})
    record = json.loads(json.dumps(metrics.to_record()))
    assert set(record) == ITERATION_KEYS and set(IterationMetrics.keys()) == ITERATION_KEYS
    assert IterationMetrics.from_record(record) == metrics
    with pytest.raises(TypeError):  # a key lost or renamed is an error, not a default
        IterationMetrics.from_record({k: v for k, v in record.items() if k != "kl_mean"})


CHUNK_DOCS = [f"post {i}: " + "my landlord kept the deposit " * (1 + i % 4) for i in range(8)]


def test_forward_chunks_cover_the_rows_in_order() -> None:
    assert forward_chunks(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert forward_chunks(8, 0) == [slice(0, 8)]
    assert forward_chunks(2, 5) == [slice(0, 2)]


def test_negative_forward_batch_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"roles\.forward_batch_size"):
        load_config(PPOConfig, None, ["roles.forward_batch_size=-1"])


@pytest.fixture(scope="module", params=["tiny-t5", "tiny-gpt2"])
def local_roles(request, tmp_path_factory) -> LocalRoles:
    """Every role on ``request.param`` with a tiny-gpt2 reward model (one instance per policy)."""
    cfg = load_config(PPOConfig, None, [
        f"output_dir={tmp_path_factory.mktemp('run')}", f"policy.name_or_path={request.param}",
        "policy.max_source_length=64", "ppo.max_new_tokens=10", "ppo.rollout_batch_size=8",
        "reward.model.name_or_path=tiny-gpt2", "reward.model.max_source_length=96",
    ])
    torch.manual_seed(0)
    return LocalRoles(cfg)


def _set_chunk(roles: LocalRoles, size: int) -> None:
    roles.generator.cfg.roles.forward_batch_size = size  # one RolesConfig shared by every role
    assert roles.scorer.roles.forward_batch_size == roles.reference.cfg.roles.forward_batch_size == size


def test_chunked_forwards_equal_one_pass(local_roles: LocalRoles) -> None:
    """Reference and old log-probs, values and reward scores in chunks of 3 rows match one pass."""
    _set_chunk(local_roles, 0)
    rollout = local_roles.generate(CHUNK_DOCS, seed=1)
    whole = (local_roles.ref_logprobs(rollout), *local_roles.evaluate(rollout))
    scores = local_roles.score(rollout.documents, rollout.summaries)
    _set_chunk(local_roles, 3)
    try:
        chunked = (local_roles.ref_logprobs(rollout), *local_roles.evaluate(rollout))
        chunked_scores = local_roles.score(rollout.documents, rollout.summaries)
    finally:
        _set_chunk(local_roles, 0)
    for one, parts in zip(whole, chunked):
        assert parts.shape == one.shape == rollout.mask.shape
        torch.testing.assert_close(parts * rollout.mask, one * rollout.mask, atol=1e-5, rtol=0)
    for one, parts in zip(scores, chunked_scores):
        assert parts.shape == (8,)
        torch.testing.assert_close(parts, one, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("forward", "generate"), [(3, 0), (0, 3), (8, 3)])
def test_chunked_generation_is_consistent_and_reproducible(
    local_roles: LocalRoles, forward: int, generate: int
) -> None:
    """Chunks of 3 rows, from roles.generate_batch_size or, when it is 0, roles.forward_batch_size."""
    roles_cfg = local_roles.generator.cfg.roles
    _set_chunk(local_roles, forward)
    roles_cfg.generate_batch_size = generate
    calls: list[int] = []
    sample = experience_module.generate_rollout

    def counted(policy, documents, **kwargs):
        calls.append(len(documents))
        return sample(policy, documents, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(roles_module, "generate_rollout", counted)
            first, again = (local_roles.generate(CHUNK_DOCS, seed=5) for _ in range(2))
    finally:
        _set_chunk(local_roles, 0)
        roles_cfg.generate_batch_size = 0
    assert calls == [3, 3, 2] * 2
    tokenizer = local_roles.generator.policy.tokenizer
    assert first.documents == CHUNK_DOCS
    assert first.response_ids.shape[0] == first.mask.shape[0] == len(first.summaries) == 8
    torch.testing.assert_close(first.mask, response_mask(first.response_ids, tokenizer.eos_token_id))
    assert torch.equal(first.ended, (first.response_ids == tokenizer.eos_token_id).any(1))
    assert first.summaries == tokenizer.batch_decode(first.response_ids, skip_special_tokens=True)
    assert torch.equal(first.response_ids, again.response_ids) and first.summaries == again.summaries
    assert torch.equal(first.mask, again.mask) and torch.equal(first.ended, again.ended)
    for name, tensor in first.query.items():
        assert torch.equal(tensor, again.query[name])


@pytest.mark.parametrize(("overrides", "single"), [
    (["ppo.advantage=grpo", "ppo.samples_per_document=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=8",
      "ppo.epochs=1"], True),
    (["ppo.advantage=grpo", "ppo.samples_per_document=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=4",
      "ppo.epochs=1"], False),  # two updates: the second is off-policy
    (["ppo.advantage=grpo", "ppo.samples_per_document=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=8",
      "ppo.epochs=2"], False),
    (["ppo.advantage=rloo", "ppo.samples_per_document=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=8",
      "ppo.epochs=1"], False),  # KL in the reward needs the rollout's log-probs
    (["ppo.rollout_batch_size=8", "ppo.minibatch_size=8", "ppo.epochs=1", "ppo.kl_in=loss"], False),  # critic
    (["ppo.advantage=grpo", "ppo.samples_per_document=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=8",
      "ppo.epochs=1", "ppo.async_rollout=true"], False),  # sampled by older weights
])
def test_single_update_only_when_one_on_policy_step_is_all(overrides: list[str], single: bool) -> None:
    assert load_config(PPOConfig, None, overrides).ppo.single_update is single


def test_single_update_takes_pi_old_from_the_learners_forward(tmp_path: Path) -> None:
    """With one update per rollout, skipping the old-log-prob pass changes neither the step nor the KL."""
    cfg = load_config(PPOConfig, None, [
        f"output_dir={tmp_path}", "policy.name_or_path=tiny-gpt2", "policy.max_source_length=64",
        "ppo.max_new_tokens=10", "ppo.advantage=grpo", "ppo.samples_per_document=2",
        "ppo.rollout_batch_size=4", "ppo.minibatch_size=8", "ppo.epochs=1", "ppo.lr=1e-2",
    ])
    assert cfg.ppo.single_update
    rows = [document for document in CHUNK_DOCS[:4] for _ in range(2)]

    def step(roles: LocalRoles, skip: bool, seed: int):
        rollout = roles.generate(rows, seed=seed)
        _, scores = roles.score(rows, rollout.summaries)
        ref = roles.ref_logprobs(rollout)
        logprobs, values = roles.evaluate(rollout)
        batch = build_batch(rollout, scores, None if skip else logprobs, ref, values, 0.05, cfg.ppo)
        stats = roles.train(batch)
        return stats, (kl_penalty(logprobs, ref, "k1") * rollout.mask).sum(1).mean().item(), rollout

    results = []
    for skip in (True, False):
        torch.manual_seed(0)
        roles = LocalRoles(cfg)
        step(roles, False, seed=2)  # the policy leaves the reference: a KL to measure
        roles.sync()
        stats, kl, rollout = step(roles, skip, seed=3)
        weights = {k: v.clone() for k, v in roles.learner.policy.model.state_dict().items()}
        results.append((stats, kl, weights, rollout.response_ids))
    (skipped, kl, weights, ids), (evaluated, _, evaluated_weights, evaluated_ids) = results
    assert torch.equal(ids, evaluated_ids)
    assert skipped.update_kl == pytest.approx(kl, abs=1e-5) and kl > 0
    assert skipped.policy_loss == pytest.approx(evaluated.policy_loss, abs=1e-6)
    assert skipped.clip_fraction == skipped.approx_kl == 0.0
    moved = 0
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, evaluated_weights[name], atol=1e-6, rtol=1e-5)
        moved += not torch.equal(tensor, roles.generator.policy.model.state_dict()[name])
    assert moved > 0  # the step changed the learner's weights


@pytest.mark.parametrize("overrides", [
    [],  # gae: value model, token-mean loss
    ["ppo.advantage=grpo", "ppo.samples_per_document=2", "ppo.loss_aggregation=sequence_mean"],
])
def test_an_update_in_chunks_takes_the_step_of_one_pass(tmp_path: Path, overrides: list[str]) -> None:
    """roles.forward_batch_size splits an update's forward and backward; the step stays one pass's."""
    cfg = load_config(PPOConfig, None, [
        f"output_dir={tmp_path}", "policy.name_or_path=tiny-gpt2", "policy.max_source_length=64",
        "ppo.max_new_tokens=10", "ppo.rollout_batch_size=8", "ppo.minibatch_size=8", "ppo.epochs=1",
        "ppo.lr=1e-4", "ppo.stop_at_eos=true", *overrides,
    ])
    weights, stats = [], []
    for chunk in (0, 3):
        torch.manual_seed(0)
        roles = LocalRoles(cfg)
        cfg.roles.forward_batch_size = 0
        rows = CHUNK_DOCS[: cfg.ppo.rollout_batch_size // cfg.ppo.samples_per_document]
        rows = [document for document in rows for _ in range(cfg.ppo.samples_per_document)]
        rollout = roles.generate(rows, seed=3)
        rollout.mask[0, 2:] = 0  # rows of different lengths: shares differ by tokens and rows
        _, scores = roles.score(rows, rollout.summaries)
        logprobs, values = roles.evaluate(rollout)
        batch = build_batch(rollout, scores, logprobs, roles.ref_logprobs(rollout), values, 0.05, cfg.ppo)
        cfg.roles.forward_batch_size = chunk
        stats.append(roles.train(batch))
        weights.append({k: v.clone() for k, v in roles.learner.engine.module.state_dict().items()})
    cfg.roles.forward_batch_size = 0
    # Adam moves every weight by about lr whatever its gradient's size, so a float-rounding
    # difference in a tiny gradient shows as up to ~lr/10; the gradients themselves agree to 1e-7.
    start = {k: v for k, v in roles.generator.policy.model.state_dict().items()}
    moved = max((tensor - start[name.removeprefix("policy.")]).abs().max().item()
                for name, tensor in weights[0].items() if name.removeprefix("policy.") in start)
    assert moved > 5e-5  # the step moved the policy by about lr
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], atol=1e-6, rtol=0, msg=name)
    for key, value in vars(stats[0]).items():
        assert getattr(stats[1], key) == pytest.approx(value, abs=1e-6), key
    assert stats[0].policy_loss != 0.0


def test_async_rollout_samples_with_the_weights_of_one_update_ago_and_resumes_before_them(
    tmp_path: Path,
) -> None:
    """ppo.async_rollout on local roles: the same steps as on Ray, one after another. The first batch
    is on-policy; each later one was sampled before the previous update, so its ratio starts away
    from 1 (approx_kl > 0) where the synchronous loop's single update starts at exactly 1."""
    overrides = [f"output_dir={tmp_path}", "policy.name_or_path=tiny-gpt2", "policy.max_source_length=64",
                 "ppo.max_new_tokens=10", "ppo.advantage=grpo", "ppo.samples_per_document=2",
                 "ppo.rollout_batch_size=4", "ppo.minibatch_size=8", "ppo.epochs=1", "ppo.lr=1e-2",
                 "ppo.iterations=3", "ppo.checkpoint_every=2", "ppo.publish_every=100"]
    documents = CHUNK_DOCS
    runs = {}
    for overlap in (False, True):
        cfg = load_config(PPOConfig, None, [*overrides, f"ppo.async_rollout={str(overlap).lower()}",
                                            f"output_dir={tmp_path / str(overlap)}"])
        torch.manual_seed(0)
        stream, roles = PromptStream(lambda epoch: iter(documents)), LocalRoles(cfg)

        def no_old_logprob_pass(rollout):
            raise AssertionError("pi_old is the learner's own forward, or the sampler's log-probs")

        roles.evaluate = no_old_logprob_pass  # type: ignore[method-assign]
        runs[overlap] = PPOTrainer(cfg, roles, stream, lambda m: None).run()
    synchronous, overlapped = runs[False], runs[True]
    assert [m.rollout_lag for m in synchronous] == [0, 0, 0]
    assert [m.rollout_lag for m in overlapped] == [0, 1, 1]
    assert all(m.approx_kl == 0.0 for m in synchronous)  # pi_old is the policy each update starts from
    # pi_old is the generator's own log-probs: equal to the learner's up to float rounding at lag 0
    assert overlapped[0].approx_kl < 1e-9 and all(m.approx_kl > 1e-6 for m in overlapped[1:])
    # The checkpoint after iteration 2 resumes before iteration 3's rows, which were being sampled.
    state = json.loads((tmp_path / "True" / "checkpoints" / "iter_000002" / TRAINER_STATE).read_text())
    assert state["prompts"] == {"epoch": 0, "position": 8}

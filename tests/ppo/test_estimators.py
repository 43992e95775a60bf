"""The estimator registry and the critic-free estimators (grpo, rloo, reinforce_pp) wired into the PPO
loop: their config checks, the advantages the trainer builds, a learner with no value model, resume,
and learning."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import get_args

import pytest
import torch
from support.ppo import DOCUMENTS, ppo_config

from rlhf.config.core import ConfigError, load_config, parse_cli
from rlhf.metrics import IterationMetrics
from rlhf.ppo import functional as F
from rlhf.ppo.config import PPOAlgoConfig, PPOConfig
from rlhf.ppo.estimators import ESTIMATORS, AdvantageKind
from rlhf.ppo.experience import Rollout
from rlhf.ppo.roles import Learner, LocalRoles
from rlhf.ppo.trainer import PPOTrainer, PromptStream, build_batch


def _error(*overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_config(PPOConfig, None, list(overrides))
    return err.value


# ------------------------------------------------------------------------------ the registry


def test_the_advantage_choices_are_the_registry() -> None:
    """AdvantageKind (the config's choices) and ESTIMATORS (what runs) cannot drift apart."""
    assert get_args(AdvantageKind) == tuple(ESTIMATORS)


def test_the_help_and_an_unknown_choice_name_every_estimator() -> None:
    advantage = next(f for f in dataclasses.fields(PPOAlgoConfig) if f.name == "advantage")
    assert all(f"{name} (" in advantage.metadata["help"] for name in ESTIMATORS)
    err = _error("ppo.advantage=ppo")
    assert err.key == "ppo.advantage" and all(repr(name) in err.message for name in ESTIMATORS)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_the_config_takes_each_estimators_traits_from_the_registry(name: str) -> None:
    estimator = ESTIMATORS[name]
    k = 2 if estimator.needs_groups else 1
    algo = load_config(PPOConfig, None, [f"ppo.advantage={name}", f"ppo.samples_per_document={k}"]).ppo
    assert algo.estimator is estimator and algo.uses_critic == estimator.uses_critic
    assert algo.kl_in == estimator.default_kl_in
    if estimator.needs_groups:
        assert _error(f"ppo.advantage={name}").key == "ppo.samples_per_document"


def test_group_estimators_need_two_samples_per_document_and_the_cli_exits_2(capsys) -> None:
    err = _error("ppo.advantage=grpo")  # k defaults to 1
    assert err.key == "ppo.samples_per_document" and "ppo.advantage=grpo" in err.message
    assert _error("ppo.advantage=rloo", "ppo.samples_per_document=1").key == "ppo.samples_per_document"
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(PPOConfig, ["ppo.advantage=grpo"], prog="ppo.py")
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppo.py: error: ppo.samples_per_document: ")
    # REINFORCE++ has a baseline without groups (the batch whitening): k = 1 is fine.
    assert load_config(PPOConfig, None, ["ppo.advantage=reinforce_pp"]).ppo.samples_per_document == 1


def test_a_value_model_with_a_critic_free_estimator_is_one_error_naming_both_keys(capsys) -> None:
    overrides = ["ppo.advantage=grpo", "ppo.samples_per_document=2", "value.name_or_path=tiny-t5"]
    err = _error(*overrides)
    assert err.key == "value" and "ppo.advantage=grpo" in err.message
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(PPOConfig, overrides, prog="ppo.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"ppo.py: error: value: {err.message}"]
    assert load_config(PPOConfig, None, ["value.name_or_path=tiny-t5"]).value is not None  # gae keeps it


def test_minibatch_size_counts_summaries() -> None:
    err = _error("ppo.rollout_batch_size=4", "ppo.samples_per_document=3", "ppo.minibatch_size=8")
    assert err.key == "ppo.minibatch_size"
    assert "rollout_batch_size (4) x samples_per_document (3)" in err.message
    # 12 summaries: 12 divides them although it does not divide the 4 documents.
    cfg = load_config(PPOConfig, None, ["ppo.rollout_batch_size=4", "ppo.samples_per_document=3",
                                        "ppo.minibatch_size=12", "ppo.advantage=rloo"])
    assert cfg.ppo.summaries_per_iteration == 12
    assert _error("ppo.rollout_batch_size=4", "ppo.samples_per_document=3", "ppo.minibatch_size=6",
                  "roles.learner_workers=4").key == "roles.learner_workers"
    colocated = _error("roles.colocate=true", "roles.rollout_workers=2")
    assert colocated.key == "roles.rollout_workers" and "roles.colocate=false" in colocated.message
    assert load_config(PPOConfig, None, ["roles.colocate=true"]).actors == 1
    # A rule-based reward.fn (the default) scores in the driver: no reward actor, and none to ask for.
    assert load_config(PPOConfig, None, []).actors == 3
    assert load_config(PPOConfig, None, ["reward.model.name_or_path=tiny-gpt2",
                                         "roles.reward_workers=2"]).actors == 5
    rule = _error("roles.reward_workers=2")
    assert rule.key == "roles.reward_workers" and "scores in the driver" in rule.message


def test_kl_defaults_follow_the_estimator_unless_given() -> None:
    def algo(*overrides: str) -> PPOAlgoConfig:
        return load_config(PPOConfig, None, ["ppo.samples_per_document=2", *overrides]).ppo

    gae = load_config(PPOConfig, None, []).ppo
    assert (gae.advantage, gae.kl_in, gae.kl_kind, gae.loss_aggregation, gae.samples_per_document,
            gae.scale_by_std) == ("gae", "reward", "k1", "token_mean", 1, True)
    assert (algo().kl_in, algo().kl_kind) == ("reward", "k1")  # gae, with the ppo section given
    assert (algo("ppo.advantage=grpo").kl_in, algo("ppo.advantage=grpo").kl_kind) == ("loss", "k3")
    assert (algo("ppo.advantage=rloo").kl_in, algo("ppo.advantage=rloo").kl_kind) == ("reward", "k1")
    assert algo("ppo.advantage=reinforce_pp").kl_in == "reward"
    assert algo("ppo.advantage=grpo", "ppo.kl_kind=k2").kl_kind == "k2"
    assert algo("ppo.advantage=grpo", "ppo.kl_in=reward").kl_kind == "k1"
    assert algo("ppo.kl_in=loss").kl_kind == "k3"


# ------------------------------------------------------------------------------ advantages


def _hand_batch() -> tuple[Rollout, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two documents x k=3 summaries of 1 to 4 tokens: rollout, scores, log-probs, reference log-probs."""
    lengths = torch.tensor([4, 2, 3, 1, 4, 2])
    mask = (torch.arange(4) < lengths[:, None]).float()  # (6, 4)
    rollout = Rollout(
        documents=["a"] * 3 + ["b"] * 3, summaries=["s"] * 6, query={"input_ids": torch.zeros(6, 2).long()},
        response_ids=torch.ones(6, 4).long(), mask=mask, ended=torch.ones(6).bool(), pad_token_id=0,
        query_padding_side="right",
    )
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(6, 4, generator=generator) * mask
    ref_logprobs = -torch.rand(6, 4, generator=generator) * mask
    return rollout, torch.tensor([1.0, 0.0, 2.0, 3.0, 3.5, -1.0]), logprobs, ref_logprobs


def _algo(*overrides: str) -> PPOAlgoConfig:
    return load_config(PPOConfig, None, ["ppo.samples_per_document=3", "ppo.rollout_batch_size=2",
                                         "ppo.minibatch_size=6", *overrides]).ppo


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_reach_every_response_token(kind: str, scale_by_std: bool) -> None:
    rollout, scores, logprobs, ref = _hand_batch()
    for kl_in in ("loss", "reward"):
        algo = _algo(f"ppo.advantage={kind}", f"ppo.kl_in={kl_in}", f"ppo.scale_by_std={scale_by_std}")
        batch = build_batch(rollout, scores, logprobs, ref, torch.zeros(6, 4), 0.5, algo)
        # KL in the reward: each summary's score less kl_coef x its summed per-token penalty.
        kl = (F.kl_penalty(logprobs, ref, algo.kl_kind) * rollout.mask).sum(1)
        score = scores if kl_in == "loss" else scores - 0.5 * kl
        expected = F.spread_over_tokens(F.group_advantages(score, 3, kind, scale_by_std), rollout.mask)
        torch.testing.assert_close(batch.advantages, expected)
        assert batch.loss_kl_coef == (0.5 if kl_in == "loss" else 0.0)
        assert not batch.returns.any() and not batch.values.any()
    same = build_batch(rollout, scores, logprobs, ref, torch.zeros(6, 4), 0.5, _algo("ppo.advantage=gae"))
    assert not torch.allclose(same.advantages, batch.advantages)  # gae builds other advantages


def test_reinforce_pp_keeps_the_kl_penalty_per_token() -> None:
    rollout, scores, logprobs, ref = _hand_batch()
    algo = _algo("ppo.advantage=reinforce_pp", "ppo.gamma=0.9")
    batch = build_batch(rollout, scores, logprobs, ref, torch.zeros(6, 4), 0.5, algo)
    rewards = F.shape_rewards(F.group_baseline(scores, 3), logprobs, ref, rollout.mask, 0.5, "k1")
    torch.testing.assert_close(batch.rewards, rewards)
    torch.testing.assert_close(batch.advantages, F.reinforce_pp_advantages(rewards, rollout.mask, 0.9))


@pytest.mark.parametrize("whiten", [True, False])
def test_gae_is_gae_on_kl_shaped_rewards_with_the_values(whiten: bool) -> None:
    rollout, scores, logprobs, ref = _hand_batch()
    values = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)) * rollout.mask
    algo = _algo(f"ppo.whiten_advantages={whiten}", "ppo.gamma=0.9", "ppo.lam=0.8")
    batch = build_batch(rollout, scores, logprobs, ref, values, 0.5, algo)
    rewards = F.shape_rewards(scores, logprobs, ref, rollout.mask, 0.5, "k1")
    advantages, returns = F.compute_gae(rewards, values, rollout.mask, 0.9, 0.8)
    torch.testing.assert_close(batch.rewards, rewards)
    torch.testing.assert_close(batch.returns, returns)
    whitened = F.masked_whiten(advantages, rollout.mask) if whiten else advantages
    torch.testing.assert_close(batch.advantages, whitened)
    assert batch.loss_kl_coef == 0.0


# ------------------------------------------------------------------------------ the learner and resume


def _critic_free_cfg(tmp_path: Path, *overrides: str) -> PPOConfig:
    tmp_path.mkdir(exist_ok=True)
    return ppo_config(tmp_path, "ppo.advantage=grpo", "ppo.samples_per_document=2",
                      "ppo.rollout_batch_size=2", "ppo.minibatch_size=4", "ppo.epochs=1",
                      "ppo.max_new_tokens=8", *overrides)


def test_a_critic_free_learner_trains_the_policy_alone(tmp_path: Path) -> None:
    learner = Learner(_critic_free_cfg(tmp_path))
    assert learner.value is None
    trained = {id(p) for p in learner.engine.module.parameters()}
    assert trained == {id(p) for p in learner.policy.model.parameters()}
    assert learner.engine.module is learner.policy.model


def test_critic_free_run_resumes_at_the_same_iteration(tmp_path: Path) -> None:
    """A run checkpointed after iteration 2 and resumed gives iteration 3 and the weights of the run
    that went on; each document's k rows are consecutive and sampled apart."""
    cfg = _critic_free_cfg(tmp_path / "a", "ppo.iterations=3", "ppo.checkpoint_every=1")
    roles = LocalRoles(cfg)
    generate, rows = roles.generate, []

    def recording_generate(documents: list[str], seed: int) -> Rollout:
        rollout = generate(documents, seed)
        rows.append((documents, rollout.summaries))
        return rollout

    roles.generate = recording_generate
    history = PPOTrainer(cfg, roles, PromptStream(lambda epoch: iter(DOCUMENTS)), lambda m: None).run()
    documents, summaries = rows[0]
    assert documents == [DOCUMENTS[0]] * 2 + [DOCUMENTS[1]] * 2
    assert summaries[0] != summaries[1] or summaries[2] != summaries[3]
    assert all(h.value_loss == 0.0 and math.isnan(h.explained_variance) for h in history)
    record = IterationMetrics.from_record(history[-1].to_record())
    assert record.iteration == 3 and math.isnan(record.explained_variance)

    resumed_cfg = _critic_free_cfg(tmp_path / "b", "ppo.iterations=3", "ppo.checkpoint_every=1")
    resumed_roles = LocalRoles(resumed_cfg)
    stream = PromptStream(lambda epoch: iter(DOCUMENTS))
    trainer = PPOTrainer(resumed_cfg, resumed_roles, stream, lambda m: None)
    trainer.restore(tmp_path / "a" / "run" / "checkpoints" / "iter_000002")
    resumed = trainer.run()
    assert [h.iteration for h in resumed] == [3]
    assert resumed[0].reward_mean == history[-1].reward_mean
    assert resumed[0].policy_loss == pytest.approx(history[-1].policy_loss, abs=1e-6)
    final, again = roles.learner.policy.model.state_dict(), resumed_roles.learner.policy.model.state_dict()
    assert all(torch.allclose(final[k], again[k], atol=1e-6) for k in final)


# ------------------------------------------------------------------------------ learning


@pytest.mark.parametrize(("advantage", "preset", "lr"), [
    ("grpo", "tiny-t5", "3e-3"),  # KL in the loss (k3) by default
    ("rloo", "tiny-gpt2", "5e-3"),  # KL in the reward, summed per summary
    ("reinforce_pp", "tiny-t5", "3e-3"),  # KL in the reward, per token
])
def test_critic_free_estimators_raise_a_rule_based_reward_with_bounded_kl(
    tmp_path: Path, advantage: str, preset: str, lr: str
) -> None:
    torch.manual_seed(0)
    cfg = ppo_config(tmp_path, f"ppo.advantage={advantage}", f"policy.name_or_path={preset}", f"ppo.lr={lr}",
               "ppo.samples_per_document=4", "ppo.rollout_batch_size=4", "ppo.minibatch_size=8")
    stream = PromptStream(lambda epoch: iter(DOCUMENTS))
    history = PPOTrainer(cfg, LocalRoles(cfg), stream, log=lambda metrics: None).run()
    rewards = [h.reward_mean for h in history]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert end > start + 0.25, rewards
    assert max(h.kl_mean for h in history) < 40, [h.kl_mean for h in history]
    assert all(h.response_length_mean > 0 for h in history)

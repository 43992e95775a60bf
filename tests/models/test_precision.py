"""roles.dtype / train.dtype, and the learners they make: one-rank DeepSpeed (gloo) in this process.

A CPU runs bf16 (slowly without native bf16, see ``has_native_bf16``), so the bf16 paths a GPU run
takes (DeepSpeed bf16, ZeRO-3, bf16 frozen roles) are built here for real; a Ray Train run is not
needed to reach ``deepspeed.initialize``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf.config.core import ConfigError, load_config
from rlhf.config.sections import DeepSpeedConfig, ModelConfig
from rlhf.models import load_reward_model, resolve_dtype
from rlhf.models import policy as policy_module
from rlhf.models.policy import cpu_flags, has_native_bf16
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.roles import Learner, LocalRoles, ReferenceScorer, RewardScorer, init_process_group
from rlhf.ppo.trainer import PPOTrainer, PromptStream
from rlhf.runtime import free_port
from rlhf.train.config import RewardConfig
from rlhf.train.deepspeed_setup import (
    deepspeed_config,
    initialize,
    training_config,
    zero3_init_context,
)
from rlhf.train.zero_gather import parameter_gather

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def one_rank_group() -> None:
    """DeepSpeed needs a default process group; one gloo rank, as a PPO Learner opens it."""
    init_process_group(0, 1, "127.0.0.1", free_port(), False)


def test_dtype_choices_resolve_per_device() -> None:
    assert resolve_dtype("auto", CUDA) is torch.bfloat16
    assert resolve_dtype("auto", CPU) is torch.float32
    for device in (CPU, CUDA):
        assert resolve_dtype("bf16", device) is torch.bfloat16
        assert resolve_dtype("fp32", device) is torch.float32


def test_bf16_on_a_cpu_without_native_bf16_is_named_in_a_warning(tmp_path: Path, caplog, monkeypatch) -> None:
    avx2_only = tmp_path / "cpuinfo"
    avx2_only.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n")
    assert cpu_flags(avx2_only) == frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
    assert has_native_bf16(cpu_flags(avx2_only)) is False
    assert has_native_bf16(frozenset({"avx2", "avx512_bf16"})) is True
    assert has_native_bf16(cpu_flags(tmp_path / "absent")) is None  # unknown: no warning

    monkeypatch.setattr(policy_module, "cpu_flags", lambda: cpu_flags(avx2_only))
    policy_module._warn_if_slow_bf16.cache_clear()
    with caplog.at_level("WARNING", logger=policy_module.__name__):
        assert resolve_dtype("bf16", CPU) is torch.bfloat16
        assert resolve_dtype("bf16", CPU) is torch.bfloat16
        resolve_dtype("fp32", CPU)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "dtype=bf16" in warnings[0] and "fp32" in warnings[0]
    policy_module._warn_if_slow_bf16.cache_clear()


def test_train_dtype_sets_the_deepspeed_bf16_flag() -> None:
    def bf16(*overrides: str) -> bool:
        cfg = load_config(RewardConfig, None, list(overrides))
        return training_config(cfg.train)["bf16"]["enabled"]

    assert not bf16()  # auto on CPU
    assert bf16("train.use_gpu=true")
    assert bf16("train.dtype=bf16")
    assert not bf16("train.use_gpu=true", "train.dtype=fp32")
    with pytest.raises(ConfigError, match="train.dtype"):
        load_config(RewardConfig, None, ["train.dtype=fp16"])


def _ppo(tmp_path: Path, *overrides: str) -> PPOConfig:
    return load_config(PPOConfig, None, [
        f"output_dir={tmp_path}", "policy.max_source_length=64", "ppo.rollout_batch_size=2",
        "ppo.minibatch_size=2", *overrides,
    ])


def test_roles_dtype_reaches_frozen_roles_and_the_learner(tmp_path: Path) -> None:
    cfg = _ppo(tmp_path, "roles.dtype=bf16", "reward.model.name_or_path=tiny-gpt2",
               "roles.deepspeed.zero_stage=3")
    reference = ReferenceScorer(cfg)
    assert {p.dtype for p in reference.policy.model.parameters()} == {torch.bfloat16}
    scorer = RewardScorer(cfg)
    assert {p.dtype for p in scorer.model.parameters()} == {torch.bfloat16}
    assert scorer.score(["a document"], ["a summary"])[0].dtype == torch.float32
    # ZeRO-3 + bf16: the value head is built with the partitioned bf16 backbone (it crashed here).
    learner = Learner(cfg)
    assert learner.engine.bfloat16_enabled()
    assert learner.value.head.weight.dtype == torch.bfloat16 and hasattr(learner.value.head.weight, "ds_id")
    # the ZeRO-3 policy starts as the reference
    with parameter_gather(3)(list(learner.policy.model.parameters())):
        frozen = reference.policy.model.state_dict()
        assert all(torch.equal(t, frozen[n]) for n, t in learner.policy.model.state_dict().items())
    fp32 = _ppo(tmp_path, "roles.dtype=fp32", "reward.model.name_or_path=tiny-gpt2")
    assert {p.dtype for p in RewardScorer(fp32).model.parameters()} == {torch.float32}


def test_one_bf16_ppo_iteration_with_a_bart_policy(tmp_path: Path) -> None:
    """Every role in bf16 on CPU (ZeRO-2): the learner's buffers follow, so all copies match."""
    cfg = _ppo(tmp_path, "roles.dtype=bf16", "policy.name_or_path=tiny-bart", "roles.deepspeed.zero_stage=2",
               "ppo.iterations=1", "ppo.epochs=1", "ppo.max_new_tokens=8", "ppo.checkpoint_every=100",
               "ppo.publish_every=100")
    roles = LocalRoles(cfg)
    for model in (roles.learner.policy.model, roles.generator.policy.model, roles.reference.policy.model):
        assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    documents = ["my landlord kept the deposit", "the flat had mould"]
    [metrics] = PPOTrainer(cfg, roles, PromptStream(lambda epoch: iter(documents)), log=lambda m: None).run()
    assert math.isfinite(metrics.policy_loss) and math.isfinite(metrics.kl_mean)


@pytest.mark.parametrize(("dtype", "saved"), [(torch.bfloat16, False), (torch.bfloat16, True),
                                             (torch.float32, False)],
                         ids=["bf16-fresh-head", "bf16-saved-head", "fp32-fresh-head"])
def test_reward_model_under_zero3_initializes_and_trains(tmp_path: Path, dtype: torch.dtype,
                                                         saved: bool) -> None:
    """ZeRO-3 without parameter offload: the head is partitioned in the backbone's dtype."""
    model_cfg = ModelConfig(name_or_path="tiny-gpt2", max_source_length=64)
    if saved:
        plain = load_reward_model(model_cfg)
        with torch.no_grad():
            plain.head.bias.fill_(0.5)
        plain.save(tmp_path / "reward")
        model_cfg = ModelConfig(name_or_path=str(tmp_path / "reward"), max_source_length=64)
    config = deepspeed_config(DeepSpeedConfig(zero_stage=3), micro_batch_size=2, lr=1e-3,
                              max_grad_norm=1.0, bf16=dtype == torch.bfloat16)
    with zero3_init_context(config):
        model = load_reward_model(model_cfg)
    engine, _ = initialize(model, config)
    from deepspeed.comm import comm

    # zero.Init started deepspeed.comm without building its shared-memory op (a minute of JIT compile)
    assert comm.cdb is not None and comm.cdb.shm_comm_op is None
    head = engine.module.head
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert head.weight.ds_tensor.numel() > 0
    with parameter_gather(3)(list(head.parameters())):
        assert head.weight.shape == (1, model.backbone.config.hidden_size)
        assert head.weight.float().abs().sum() > 0  # the seeded random init reached the shard
        assert head.bias.item() == (0.5 if saved else 0.0)
    batch = model.encode_pairs(["one document", "another document"], ["a summary", "b"])
    loss = engine(**batch).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)

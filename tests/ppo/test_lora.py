"""RL with LoRA: the learner trains adapters (and the value head), the base with the adapter off is
the reference, a sync moves the adapters alone on both transports, runs resume and learn."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from support.cli import run_cli
from support.ppo import DOCUMENTS, policy_state, ppo_config

from rlhf.config.core import ConfigError
from rlhf.config.sections import ModelConfig
from rlhf.models import load_policy
from rlhf.models.lora import is_adapter_folder
from rlhf.ppo.actors import RayRoles
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.roles import LocalRoles, ReferenceScorer, rl_lora
from rlhf.ppo.trainer import PPOTrainer, PromptStream
from rlhf.train.zero_gather import save_policy

SMALL = ("ppo.rollout_batch_size=4", "ppo.minibatch_size=4", "ppo.epochs=1", "ppo.max_new_tokens=8")


def _lora_cfg(tmp_path: Path, *overrides: str) -> PPOConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return ppo_config(tmp_path, "lora.r=4", "lora.dropout=0.3", *SMALL, *overrides)


def _prompts() -> PromptStream:
    return PromptStream(lambda epoch: iter(DOCUMENTS))


def _adapter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".lora_" in name)


def _perturb_adapters(model: torch.nn.Module, scale: float = 0.5) -> None:
    """LoRA starts with B = 0 (the base's outputs); give every adapter a visible update."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def test_the_learner_trains_adapters_and_the_value_head_and_loads_no_reference(tmp_path: Path) -> None:
    roles = LocalRoles(_lora_cfg(tmp_path))
    learner = roles.learner
    trained = {name for name, p in learner.engine.module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in name or name.startswith("value.head.") for name in trained)
    assert {"value.head.weight", "value.head.bias"} <= trained
    assert roles.reference is None  # the base with the adapter off serves as the reference
    dropouts = [m.p for m in learner.engine.module.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.0] * len(dropouts)  # lora.dropout=0.3 is for SFT/DPO; RL runs without


def test_the_reference_is_the_base_with_the_adapter_off(tmp_path: Path) -> None:
    cfg = _lora_cfg(tmp_path)
    roles = LocalRoles(cfg)
    rollout = roles.generate(DOCUMENTS[:4], seed=1)
    _perturb_adapters(roles.learner.policy.model)  # the policy now differs from its base
    frozen = ReferenceScorer(ppo_config(tmp_path, *SMALL)).logprobs(rollout)  # a separate copy, no adapters
    reference, (policy, _) = roles.ref_logprobs(rollout), roles.evaluate(rollout)
    torch.testing.assert_close(reference, frozen, rtol=0, atol=1e-6)
    assert (policy - reference).abs().max() > 1e-2


def test_a_lora_run_resumes_at_the_same_iteration_and_publishes_an_adapter(tmp_path: Path) -> None:
    overrides = ("ppo.iterations=3", "ppo.checkpoint_every=1", "lora.publish=adapter", "ppo.publish_every=3")
    cfg = _lora_cfg(tmp_path / "a", *overrides)
    roles = LocalRoles(cfg)
    history = PPOTrainer(cfg, roles, _prompts(), lambda m: None).run()
    assert history[0].sync_bytes == _adapter_bytes(roles.learner.policy.model)

    resumed_cfg = _lora_cfg(tmp_path / "b", *overrides)
    resumed_roles = LocalRoles(resumed_cfg)
    trainer = PPOTrainer(resumed_cfg, resumed_roles, _prompts(), lambda m: None)
    trainer.restore(tmp_path / "a" / "run" / "checkpoints" / "iter_000002")
    resumed = trainer.run()
    assert [h.iteration for h in resumed] == [3]
    assert resumed[0].reward_mean == history[-1].reward_mean
    final = roles.learner.policy.model.state_dict()
    again = resumed_roles.learner.policy.model.state_dict()
    assert all(torch.allclose(final[k], again[k], atol=1e-6) for k in final)

    published = tmp_path / "a" / "run" / "registry" / "v0001"
    assert is_adapter_folder(str(published))
    loaded = load_policy(ModelConfig(name_or_path=str(published), max_source_length=96), dropout=False)
    batch = loaded.encode_pairs(DOCUMENTS[:2], ["a summary"] * 2)
    with torch.no_grad():
        expected = roles.learner.policy.model(**batch).logits
        torch.testing.assert_close(loaded.model(**batch).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("preset", "overrides"), [
    ("tiny-t5", ("ppo.lr=3e-2",)),
    # Attention adapters barely move a 2-layer random causal LM's output (KL < 1.3 after 14
    # iterations at lr up to 0.1): its LM head (untied in tiny-llama) gets one too.
    ("tiny-llama", ("ppo.lr=1e-2", "lora.target_modules=[q_proj,v_proj,lm_head]")),
])
def test_ppo_with_lora_raises_a_rule_based_reward_with_bounded_kl(
    tmp_path: Path, preset: str, overrides: tuple[str, ...]
) -> None:
    torch.manual_seed(0)
    cfg = ppo_config(tmp_path, f"policy.name_or_path={preset}", "lora.r=8", "ppo.iterations=14", *overrides)
    history = PPOTrainer(cfg, LocalRoles(cfg), _prompts(), lambda m: None).run()
    rewards = [h.reward_mean for h in history]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert end > start + 0.25, rewards
    assert max(h.kl_mean for h in history) < 80, [h.kl_mean for h in history]


def test_bad_lora_values_exit_2_naming_the_key(tmp_path: Path) -> None:
    run = run_cli("ppo.py", "lora.r=-1")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "error: lora.r" in run.stderr, run.stderr
    for override, key in (("lora.alpha=0", "lora.alpha"), ("lora.dropout=1.5", "lora.dropout")):
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            _lora_cfg(tmp_path, override)


def _logits(policy, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``policy``'s logits on two fixed pairs, with ``state`` loaded first when given."""
    if state is not None:
        policy.model.load_state_dict(state)
    batch = policy.encode_pairs(DOCUMENTS[:2], ["a summary", "another"])
    with torch.no_grad():
        return policy.model(**batch).logits


@pytest.mark.usefixtures("ray_local")
def test_zero3_learners_start_adapters_at_the_base_sync_them_alone_and_publish_both_ways(
    tmp_path: Path,
) -> None:
    """Two ZeRO-3 ranks whose adapters are partitioned like the base, gathered 20 KiB at a time: the
    rollout worker starts from the learner's initial model, the base (B = 0); a sync then moves the
    adapters alone, through the broadcast group and through the object store (which brings a worker
    with stale adapters back to the learner's); both publish modes are the trained model (the merged
    folder without peft). With gae, so the value model's backbone carries partitioned adapters too."""
    cfg = _lora_cfg(tmp_path, "ppo.iterations=1", "ppo.lr=3e-2", "roles.learner_workers=2",
                    "roles.deepspeed.zero_stage=3", "roles.cpus_per_actor=0.4",
                    "roles.weight_sync=collective", "roles.sync_bucket_mb=0.02")
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"

    def save_adapter(learner) -> None:  # every learner rank: gathers the adapters alone
        save_policy(learner.policy, adapter_dir, "adapter", learner.gather, learner.bucket_mb)

    def stale_adapters(generator) -> None:  # a rollout worker's adapters drift from the learner's
        with torch.no_grad():
            for name, parameter in generator.policy.model.named_parameters():
                if ".lora_" in name:
                    parameter.add_(1.0)

    roles = RayRoles(cfg)
    try:
        initial = policy_state(roles.generators[0])  # the first sync: every tensor
        [metrics] = PPOTrainer(cfg, roles, _prompts(), lambda m: None).run()
        roles.save_policy(str(merged_dir))  # lora.publish=merged, the default
        ray.get([learner.__ray_call__.remote(save_adapter) for learner in roles.learners])
        synced = policy_state(roles.generators[0])
        ray.get(roles.generators[0].__ray_call__.remote(stale_adapters))
        roles.version += 1
        resent = roles._send_through_object_store(roles.generators, every=False)
        restored = policy_state(roles.generators[0])
    finally:
        roles.shutdown()
    local = load_policy(cfg.policy, dropout=False, lora=rl_lora(cfg))
    base = load_policy(cfg.policy, dropout=False)
    assert all(not t.any() for name, t in initial.items() if ".lora_B." in name)
    assert all(t.abs().sum() > 0 for name, t in initial.items() if ".lora_A." in name)
    torch.testing.assert_close(_logits(local, initial), _logits(base), rtol=0, atol=0)
    adapters = {name: t for name, t in synced.items() if ".lora_" in name}
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    assert metrics.sync_bytes == resent.bytes == adapter_bytes
    assert restored.keys() == synced.keys() and all(torch.equal(restored[k], t) for k, t in synced.items())
    full = sum(t.numel() * t.element_size() for t in synced.values())  # tied ones counted twice
    assert full > 10 * adapter_bytes  # what a full fine-tune would send each time
    assert any(not torch.equal(t, initial[name]) for name, t in adapters.items())  # trained
    saved = load_file(adapter_dir / "adapter_model.safetensors")  # PEFT drops the adapter name
    assert saved.keys() == {name.replace(".default.", ".") for name in adapters}
    assert all(torch.equal(saved[name.replace(".default.", ".")], t) for name, t in adapters.items())
    assert (adapter_dir / "base.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    trained = _logits(local, synced)
    for folder in (merged_dir, adapter_dir):
        published = load_policy(ModelConfig(name_or_path=str(folder), max_source_length=96), dropout=False)
        assert not published.adapted  # an adapter folder loads merged into its base
        torch.testing.assert_close(_logits(published), trained, rtol=0, atol=1e-5)

"""The PPO tests' setup: documents, a rule-based reward and a small config; reading an actor's policy."""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from rlhf.config.core import load_config
from rlhf.ppo.config import PPOConfig

DOCUMENTS = [f"post {i}: my landlord kept the deposit and the flat had mould" for i in range(32)]

# Dense enough for a random byte-level policy: about 7% of its bytes are lowercase letters.
LOWERCASE_REWARD = (
    "def score(documents, summaries):\n    return [sum(c.islower() for c in s) / 4 for s in summaries]\n"
)


def ppo_overrides(tmp_path: Path, *overrides: str, rule_reward: bool = True) -> list[str]:
    """The test setup as ``jobs/ppo.py`` arguments; with ``rule_reward`` the lowercase rule scores
    (written under ``tmp_path``), else overrides name the reward."""
    reward = tmp_path / "lowercase_reward.py"
    reward.write_text(LOWERCASE_REWARD)
    return [
        *([f"reward.fn={reward}:score"] if rule_reward else []),
        f"output_dir={tmp_path / 'run'}", "policy.max_source_length=96",
        "ppo.max_new_tokens=24", "ppo.kl_coef=0.01", "ppo.lr=1e-3", "ppo.iterations=12",
        "ppo.checkpoint_every=100", "ppo.publish_every=100", *overrides,
    ]


def ppo_config(tmp_path: Path, *overrides: str, rule_reward: bool = True) -> PPOConfig:
    """The config of ``ppo_overrides``, loaded as the job loads it."""
    return load_config(PPOConfig, None, ppo_overrides(tmp_path, *overrides, rule_reward=rule_reward))


def policy_state(actor) -> dict[str, torch.Tensor]:
    """The state dict of the policy a generator or learner actor holds."""
    def read(role) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in role.policy.model.state_dict().items()}
    return ray.get(actor.__ray_call__.remote(read))

"""Reward-model training on comparisons: `python jobs/reward.py [--config F] [k=v ...]`."""

from rlhf.cli import run_main
from rlhf.config.core import parse_cli
from rlhf.train.config import RewardConfig

if __name__ == "__main__":
    args = parse_cli(RewardConfig, prog="reward.py", resumable=True)
    from rlhf.train.reward import run_reward  # heavy imports only once the config is valid

    run_main(run_reward, args, prog="reward.py")

"""RLHF with PPO across Ray actors: `python jobs/ppo.py [--config F] [--resume] [k=v ...]`."""

from rlhf.cli import run_main
from rlhf.config.core import parse_cli
from rlhf.ppo.config import PPOConfig

if __name__ == "__main__":
    args = parse_cli(PPOConfig, prog="ppo.py", resumable=True)
    from rlhf.ppo.job import run_ppo  # heavy imports only once the config is valid

    run_main(run_ppo, args, prog="ppo.py")

"""Supervised fine-tuning of the summarization policy: `python jobs/sft.py [--config F] [k=v ...]`."""

from rlhf.cli import run_main
from rlhf.config.core import parse_cli
from rlhf.train.config import SFTConfig

if __name__ == "__main__":
    args = parse_cli(SFTConfig, prog="sft.py", resumable=True)
    from rlhf.train.sft import run_sft  # heavy imports only once the config is valid

    run_main(run_sft, args, prog="sft.py")

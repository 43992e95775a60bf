"""DPO/IPO of the policy on comparisons: `python jobs/dpo.py [--config F] [k=v ...] [--resume]`."""

from rlhf.cli import run_main
from rlhf.config.core import parse_cli
from rlhf.dpo.config import DPOConfig

if __name__ == "__main__":
    args = parse_cli(DPOConfig, prog="dpo.py", resumable=True)
    from rlhf.dpo.task import run_dpo  # heavy imports only once the config is valid

    run_main(run_dpo, args, prog="dpo.py")

"""Evaluate a reward model and/or a policy: `python jobs/eval.py reward_model.name_or_path=... ...`."""

from rlhf.cli import run_main
from rlhf.config.core import parse_cli
from rlhf.eval.config import EvalConfig

if __name__ == "__main__":
    args = parse_cli(EvalConfig, prog="eval.py")
    from rlhf.eval.job import run_eval  # heavy imports only once the config is valid

    run_main(run_eval, args, prog="eval.py")

"""Evaluate a reward model and/or a policy: `python jobs/eval.py reward_model.name_or_path=... ...`."""

from rlhf.cli import run_main
from rlhf.config.core import parse_cli
from rlhf.eval.config import EvalConfig

if __name__ == "__main__":
    args = parse_cli(EvalConfig, prog="eval.py")
    # heavy imports only once the config is valid; rlhf.dpo's run_eval is rlhf.eval.job's, with a
    # DPO policy's implicit reward when dpo_policy is set
    from rlhf.dpo.implicit import run_eval

    run_main(run_eval, args, prog="eval.py")

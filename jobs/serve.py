"""Serve the policy and the comparison page: `python jobs/serve.py [--config F] [k=v ...]`."""

from rlhf.cli import run_main
from rlhf.config.core import parse_cli
from rlhf.serve.config import ServeConfig

if __name__ == "__main__":
    args = parse_cli(ServeConfig, prog="serve.py")
    from rlhf.serve.app import run_serve  # heavy imports only once the config is valid

    run_main(run_serve, args, prog="serve.py")

"""The online loop: `python jobs/online.py [--config F] [k=v ...]`; restart it to resume."""

from rlhf.cli import run_main
from rlhf.config.core import parse_cli
from rlhf.online.config import OnlineConfig

if __name__ == "__main__":
    args = parse_cli(OnlineConfig, prog="online.py")
    from rlhf.online.loop import run_online  # heavy imports only once the config is valid

    run_main(run_online, args, prog="online.py")

"""`python -m rlhf.eval plot RUN_DIR [--out FILE.png]`: training curves of a run as a PNG."""

from __future__ import annotations

import argparse
import sys

from rlhf.errors import InputError
from rlhf.eval.plot import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.eval")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="reward, KL, entropy, length and clip curves of a PPO run")
    plot.add_argument("run_dir", help="output_dir of a run (holds metrics.jsonl)")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

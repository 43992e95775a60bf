"""Running a job from the command line: parse config, save it, turn input errors into one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rlhf.config.core import CliArgs, ConfigError, save_config
from rlhf.errors import InputError

T = TypeVar("T")

# Exceptions that mean "the input is wrong", as opposed to a bug: shown without a traceback.
USER_ERRORS = (ConfigError, InputError, FileNotFoundError)


def run_main(run: Callable[..., Any], args: CliArgs[T], prog: str) -> Any:
    """Save the resolved config, then call ``run(config)``, or ``run(config, resume=True)`` when
    ``--resume`` was given (only jobs that checkpoint accept it).

    Input errors exit with status 2 and one line on stderr.
    """
    # The one logging setup: rlhf's diagnostics at INFO, other libraries' at WARNING.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rlhf").setLevel(logging.INFO)
    save_config(args.config, Path(args.config.output_dir) / "config.yaml")
    try:
        return run(args.config, resume=True) if args.resume else run(args.config)
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

"""Running a job from the command line: parse config, save it, turn input errors into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rlhf.config.core import CliArgs, ConfigError, save_config
from rlhf.errors import InputError

T = TypeVar("T")

# Exceptions that mean "the input is wrong", as opposed to a bug: shown without a traceback.
USER_ERRORS = (ConfigError, InputError, FileNotFoundError)


def run_main(run: Callable[[T, bool], Any], args: CliArgs[T], prog: str) -> Any:
    """Save the resolved config, then call ``run(config, resume)``.

    Input errors exit with status 2 and one line on stderr.
    """
    save_config(args.config, Path(args.config.output_dir) / "config.yaml")
    try:
        return run(args.config, args.resume)
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

"""A job script (``python jobs/ppo.py ...``) or a package's command line (``python -m rlhf.eval ...``)
run inside the test process, as a shell would run it: ``__main__``, that argv, and the exit status
and output it leaves.

In-process because a new interpreter pays seconds of imports (torch, transformers, DeepSpeed) that
the test process has already paid. Tests of what only a new process shows (its environment, that
Ray never starts, that it ends on a signal) keep ``subprocess``.
"""

from __future__ import annotations

import io
import os
import re
import runpy
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from unittest import mock

from support.paths import ROOT

# A line a Ray worker's log wrote, which the session's Ray streams to this process's stderr
# (``log_to_driver``): "(ServeReplica:app:Name pid=123) ...", colour codes optional.
RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\([^()]* pid=\d+[^()]*\)")


@dataclass(frozen=True)
class Ran:
    """What a command left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(command: str, *args: str, env: dict[str, str] | None = None) -> Ran:
    """``command``: a job file under ``jobs/`` ("ppo.py") or a module run with ``-m`` ("rlhf.eval");
    ``env``: variables set for the run only. Lines that other processes' Ray workers streamed to
    stderr meanwhile are left out: they are not the command's."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", [command, *args]), mock.patch.dict(os.environ, env or {}), \
            redirect_stdout(out), redirect_stderr(err):
        try:
            if command.endswith(".py"):
                runpy.run_path(str(ROOT / "jobs" / command), run_name="__main__")
            else:
                runpy.run_module(command, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:  # as the interpreter does: None is 0, a message is printed and 1
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
                code = 1
    own = [line for line in err.getvalue().splitlines(keepends=True) if not RAY_WORKER_LINE.match(line)]
    return Ran(code, out.getvalue(), "".join(own))

"""The README's first two commands stay true: CI runs the very same test command."""

from __future__ import annotations

import re

from support.paths import ROOT


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    run_command, test_command = _readme_commands()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith("#")]
    assert test_command in ci_lines
    assert "pytest" in test_command and "pip install torch==2.13.0" in test_command
    assert "jobs/" in run_command and "pip install -e ." in run_command

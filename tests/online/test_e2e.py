"""The product loop end to end on a real local Ray cluster (tests/e2e/online_scenario.py): Serve, a
submitted job, serves the published policy; a simulated person who prefers shorter summaries
compares and chooses over HTTP; a submitted online job's reward_model cycle (reward model, then RL
by GRPO with every role in one colocated Ray actor) publishes a new version that Serve picks up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import ROOT

SCENARIO = ROOT / "tests" / "e2e" / "online_scenario.py"


def test_choices_from_the_served_page_train_a_policy_that_matches_them_better(tmp_path: Path):
    # The scenario is PID 1 of a private PID namespace: its exit ends the cluster it started and
    # nothing else on the machine (`ray stop` would end every Ray process here, the session's too).
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("the end-to-end test needs root and util-linux's unshare (a private PID namespace)")
    command = ["unshare", "--fork", "--pid", "--mount-proc", "--kill-child",
               sys.executable, str(SCENARIO), str(tmp_path)]
    # PID 1 of a namespace ignores SIGTERM: subprocess's timeout kills with SIGKILL.
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    written = tmp_path / "summary.json"  # absent only when `ray start` itself failed
    summary = json.loads(written.read_text()) if written.exists() else {}
    assert done.returncode == 0, summary.get("error", "") + done.stdout[-2000:] + done.stderr[-4000:]

    assert (summary["served_before"], summary["served_after"]) == ("v0001", "v0002")  # Serve picked it up
    (cycle,) = summary["cycles"]
    assert (cycle["cycle"], cycle["policy_version"]) == (1, "v0002")
    assert cycle["new"] > 0 and cycle["reward_kept"]
    # The reward model learned the simulated preference: on the choices it never trained on.
    assert summary["held_out"]["rows"] >= 15 and summary["held_out"]["accuracy"] > 0.6
    # The person prefers each cycle's policy over the starting one's more often than chance.
    rates = summary["win_rate_vs_start"]
    assert list(rates) == ["v0002"] and rates["v0002"] > 0.55, rates

"""The product loop end to end on a real local Ray cluster (tests/e2e/online_scenario.py): a PPO job
publishes a version, Serve serves it, a simulated person who prefers shorter summaries compares and
chooses over HTTP, online cycles update the reward model and publish new versions that Serve picks up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).parent / "e2e" / "online_scenario.py"
CYCLES = 1


def test_choices_from_the_served_page_train_a_policy_that_matches_them_better(tmp_path: Path):
    # `ray stop` ends every Ray process on the machine; in a private PID namespace it ends only the
    # scenario's cluster, and anything left over dies with the namespace.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("the end-to-end test needs root and util-linux's unshare (a private PID namespace)")
    command = ["unshare", "--fork", "--pid", "--mount-proc", "--kill-child",
               sys.executable, str(SCENARIO), str(tmp_path), "--cycles", str(CYCLES)]
    # PID 1 of a namespace ignores SIGTERM: subprocess's timeout kills with SIGKILL.
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    written = tmp_path / "summary.json"  # absent only when `ray start` itself failed
    summary = json.loads(written.read_text()) if written.exists() else {}
    assert done.returncode == 0, summary.get("error", "") + done.stdout[-2000:] + done.stderr[-4000:]

    assert summary["served_after"] != summary["served_before"]  # Serve picked up the online versions
    assert [c["cycle"] for c in summary["cycles"]] == list(range(1, CYCLES + 1))
    assert all(c["new"] > 0 for c in summary["cycles"]) and summary["cycles"][-1]["reward_kept"]
    assert summary["cycles"][-1]["policy_version"] == summary["served_after"]
    # The reward model learned the simulated preference: on held-out choices it never trained on.
    assert summary["held_out"]["rows"] >= 10 and summary["held_out"]["accuracy"] > 0.6
    # The person prefers the newest policy's summary more often than the starting one's.
    rates = summary["win_rate_vs_start"]
    assert rates[min(rates)] == 0.5 and rates[max(rates)] > 0.55

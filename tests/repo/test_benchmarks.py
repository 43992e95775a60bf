"""The GPU benchmark scripts (benchmarks/gpu/) run end to end on CPU with tiny architectures, so a
session that is lent a GPU can run them as they are. Their numbers mean something only on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import ROOT


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.jsonl"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu" / script), *args, "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


# ZeRO-2 here: ZeRO-3 training on CPU is covered by tests/train/test_train.py and test_ppo.py, and a
# single-process ZeRO-3 step of this script took 74 s of the suite's time.
@pytest.mark.parametrize(("task", "zero"), [("sft", "2"), ("reward", "0")])
def test_train_step_reports_throughput_memory_and_mfu(tmp_path: Path, task: str, zero: str) -> None:
    result = _run("train_step.py", "--task", task, "--arch", "tiny-led", "--source-tokens", "512",
                  "--target-tokens", "64", "--zero", zero, "--warmup", "1", "--steps", "2", tmp_path=tmp_path)
    assert result["fits"] is True and result["device"] and result["deepspeed"] != "-"
    reads = 2 if task == "reward" else 1
    assert result["tokens_per_s"] == pytest.approx(reads * 576 / result["step_s"])
    # forward+backward of 1.3M parameters (1.05M of them position embeddings) over 576 tokens
    assert 1e8 < result["flops_per_step"] < 1e10
    assert 0 < result["mfu"] < 1
    assert result["peak_memory_gib"] >= result["memory_after_init_gib"] > 0


def test_ppo_iteration_splits_time_by_role_and_compares_with_plain_generate(tmp_path: Path) -> None:
    result = _run("ppo_iteration.py", "--arch", "tiny-gpt2", "--source-tokens", "64", "--new-tokens", "16",
                  "--rollout-batch", "4", "--minibatch", "2", "--iters", "2", tmp_path=tmp_path)
    assert result["iterations"] == 2
    roles = ("generate", "score", "reference", "learn", "sync")
    assert all(result[f"median_time_{role}_s"] > 0 for role in roles)
    assert sum(result[f"median_time_{role}_s"] for role in roles) <= result["median_wall_s"]
    assert result["plain_generate_tokens_per_s"] > 0
    assert result["rollout_vs_plain_generate"] == pytest.approx(
        result["median_generate_tokens_per_s"] / result["plain_generate_tokens_per_s"])

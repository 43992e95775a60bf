"""Evaluation: length baselines by hand, and the eval job on sample data end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rlhf.config.sections import ModelConfig
from rlhf.eval.metrics import is_similar_length, length_baseline
from rlhf.models import load_reward_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def test_length_baseline_counts_ties_as_half() -> None:
    # pair 1: longer is chosen (right), pair 2: shorter chosen (wrong), pair 3: tie (0.5)
    assert length_baseline([10, 5, 7], [20, 1, 7], [1, 1, 0]) == 1.5 / 3


def test_similar_length_is_under_twenty_percent() -> None:
    assert is_similar_length(100, 81) and not is_similar_length(100, 80)


def _raw_length_baseline(path: Path) -> tuple[int, float]:
    """Independent of the loader: read the flat JSONL and skip the empty-summary rows."""
    rows = [json.loads(line) for line in path.open()]
    rows = [r for r in rows if r["summary_0"].strip() and r["summary_1"].strip()]
    credit = 0.0
    for r in rows:
        s0 = r["summary_0"].split("<|endoftext|>")[0].strip()
        s1 = r["summary_1"].split("<|endoftext|>")[0].strip()
        credit += 0.5 if len(s0) == len(s1) else float((len(s1) > len(s0)) == bool(r["choice"]))
    return len(rows), credit / len(rows)


def test_eval_job_writes_reward_and_policy_metrics(tmp_path: Path) -> None:
    reward_dir = tmp_path / "reward"
    load_reward_model(ModelConfig(name_or_path="tiny-gpt2", max_source_length=128)).save(reward_dir)
    out = tmp_path / "eval"
    comparisons = DATA / "tldr_comparisons_sample.jsonl"
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "eval.py"), f"output_dir={out}",
         f"reward_model.name_or_path={reward_dir}", "reward_model.max_source_length=128",
         f"comparisons.path={comparisons}", "policy.name_or_path=tiny-t5",
         "policy.max_target_length=8", f"references.path={DATA / 'tldr_sft_sample.jsonl'}",
         "references.limit=3", "batch_size=8"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "eval.json").read_text())
    rows, baseline = _raw_length_baseline(comparisons)
    assert report["rows"] == rows
    assert abs(report["length_baseline_accuracy"] - baseline) < 1e-9
    assert 0.0 <= report["accuracy"] <= 1.0 and 0 < report["similar_length_rows"] < rows
    assert report["policy"]["rows"] == 3
    assert {"rouge1", "rouge2", "rougeL", "summary_words_mean", "reward_mean"} <= set(report["policy"])
    assert "length_baseline_accuracy" in run.stdout  # the printed table
    assert (out / "config.yaml").is_file()


def test_eval_job_with_nothing_to_evaluate_exits_2() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "eval.py")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == ("eval.py: error: comparisons: nothing to evaluate: "
                                  "set comparisons.path or references.path")


def test_plot_renders_ppo_curves_to_png(tmp_path: Path) -> None:
    records = [{"iteration": i, "reward_mean": 0.1 * i, "kl_mean": 0.5 * i, "entropy": 4 - 0.1 * i,
                "response_length_mean": 30 - i} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = subprocess.run([sys.executable, "-m", "rlhf.eval", "plot", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    png = tmp_path / "curves.png"
    assert run.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    missing = subprocess.run([sys.executable, "-m", "rlhf.eval", "plot", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr

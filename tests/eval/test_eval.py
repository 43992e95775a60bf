"""Evaluation: length baselines by hand, and the eval job on sample data end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from support.cli import run_cli
from support.paths import ROOT

from rlhf.config.sections import ModelConfig
from rlhf.eval.evaluate import (
    evaluate_reward_model,
    is_similar_length,
    length_baseline,
    length_correlations,
    similar_length_metrics,
)
from rlhf.models import load_reward_model

DATA = ROOT / "tests" / "fixtures"


def test_length_baseline_counts_ties_as_half() -> None:
    # pair 1: longer is chosen (right), pair 2: shorter chosen (wrong), pair 3: tie (0.5)
    assert length_baseline([10, 5, 7], [20, 1, 7], [1, 1, 0]) == 1.5 / 3


def test_similar_length_is_under_twenty_percent() -> None:
    assert is_similar_length(100, 81) and not is_similar_length(100, 80)
    assert is_similar_length(100, 91, 0.1) and not is_similar_length(100, 90, 0.1)


def test_similar_length_metrics_by_hand() -> None:
    # pairs (l0, l1): (100, 95) 5% apart, (100, 85) 15%, (100, 50) 50%, (40, 40) a tie
    l0, l1 = [100, 100, 100, 40], [95, 85, 50, 40]
    choices, correct = [0, 1, 1, 0], [True, False, True, True]
    ten = similar_length_metrics(0.1, "s10", l0, l1, choices, correct)
    # within 10%: pairs 1 and 4; model right on both; baseline: pair 1 the longer (0) chosen = 1,
    # pair 4 a tie = 0.5 -> 0.75
    assert ten == {"s10_rows": 2, "s10_accuracy": 1.0, "s10_baseline_accuracy": 0.75}
    # within 20% adds pair 2: the model is wrong, the longer (0) lost -> baseline 0: 1.5 / 3
    twenty = similar_length_metrics(0.2, "s20", l0, l1, choices, correct)
    assert twenty == {"s20_rows": 3, "s20_accuracy": pytest.approx(2 / 3), "s20_baseline_accuracy": 0.5}


def test_length_correlations_per_head() -> None:
    single = load_reward_model(ModelConfig(name_or_path="tiny-gpt2"))
    lengths = [1, 2, 3]
    # one head: scores [3, 1, 2] -> rho = -1 / sqrt(2 * 2) = -0.5 (centred: [1, -1, 0] . [-1, 0, 1])
    assert length_correlations(single, torch.tensor([[3.0], [1.0], [2.0]]), lengths, "quality") == {
        "length_correlation": pytest.approx(-0.5)}
    two = load_reward_model(ModelConfig(name_or_path="tiny-gpt2"), heads="disentangled")
    # quality [3, 1, 2] (rho -0.5), length [1, 2, 3] (rho 1), total [4, 3, 5] (centred [0, -1, 1]:
    # rho = 1 / sqrt(2 * 2) = 0.5)
    per_head = torch.tensor([[3.0, 1.0], [1.0, 2.0], [2.0, 3.0]])
    assert length_correlations(two, per_head, lengths, "total") == pytest.approx({
        "length_correlation": 0.5, "length_correlation_quality": -0.5, "length_correlation_length": 1.0,
        "length_correlation_total": 0.5})


def test_reward_eval_uses_the_chosen_head() -> None:
    model = load_reward_model(ModelConfig(name_or_path="tiny-gpt2", max_source_length=64),
                              heads="disentangled")
    comparisons = pa.table({"original_text": ["a post"] * 4, "summary_0": ["a", "bb", "ccc", "dddd d"],
                            "summary_1": ["aa a", "b", "cccc", "d"], "choice": [1, 0, 1, 0]})
    s0 = model.score(comparisons["original_text"].to_pylist(), comparisons["summary_0"].to_pylist(), "total")
    s1 = model.score(comparisons["original_text"].to_pylist(), comparisons["summary_1"].to_pylist(), "total")
    report = evaluate_reward_model(model, comparisons, batch_size=3, score="total")
    assert report["accuracy"] == ((s1 > s0).long() == torch.tensor([1, 0, 1, 0])).float().mean().item()
    assert report["length_correlation"] == report["length_correlation_total"]
    quality = evaluate_reward_model(model, comparisons, batch_size=3, score="quality")
    assert quality["length_correlation"] == quality["length_correlation_quality"]


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
    run = run_cli("eval.py", f"output_dir={out}", f"reward_model.name_or_path={reward_dir}",
                  "reward_model.max_source_length=128", f"comparisons.path={comparisons}",
                  "policy.name_or_path=tiny-t5", "policy.max_target_length=8",
                  f"references.path={DATA / 'tldr_sft_sample.jsonl'}", "references.limit=3", "batch_size=8")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "eval.json").read_text())
    rows, baseline = _raw_length_baseline(comparisons)
    assert report["rows"] == rows
    assert abs(report["length_baseline_accuracy"] - baseline) < 1e-9
    assert 0.0 <= report["accuracy"] <= 1.0 and 0 < report["similar_length_rows"] < rows
    assert report["similar_length_10_rows"] <= report["similar_length_20_rows"]
    assert report["similar_length_20_rows"] == report["similar_length_rows"]
    assert report["similar_length_20_accuracy"] == report["similar_length_accuracy"]
    assert -1.0 <= report["length_correlation"] <= 1.0 and "length_correlation_quality" not in report
    assert report["policy"]["rows"] == 3
    assert {"rouge1", "rouge2", "rougeL", "summary_words_mean", "reward_mean"} <= set(report["policy"])
    summaries = [json.loads(line) for line in (out / "summaries.jsonl").read_text().splitlines()]
    assert [row["reference"] for row in summaries] == [
        json.loads(line)["summary"] for line in (DATA / "tldr_sft_sample.jsonl").read_text().splitlines()[:3]
    ]
    mean_reward = sum(row["reward"] for row in summaries) / 3
    assert abs(mean_reward - report["policy"]["reward_mean"]) < 1e-5
    assert "length_baseline_accuracy" in run.stdout  # the printed table
    assert "similar_length_10_baseline_accuracy" in run.stdout and "length_correlation" in run.stdout
    assert (out / "config.yaml").is_file()


def test_eval_job_with_nothing_to_evaluate_exits_2() -> None:
    run = run_cli("eval.py")
    assert run.returncode == 2
    assert run.stderr.strip() == ("eval.py: error: comparisons: nothing to evaluate: "
                                  "set comparisons.path or references.path")


def test_plot_renders_ppo_curves_to_png(tmp_path: Path) -> None:
    records = [{"iteration": i, "reward_mean": 0.1 * i, "kl_mean": 0.5 * i, "entropy": 4 - 0.1 * i,
                "response_length_mean": 30 - i} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = run_cli("rlhf.eval", "plot", str(tmp_path))
    assert run.returncode == 0, run.stderr
    png = tmp_path / "curves.png"
    assert run.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    missing = run_cli("rlhf.eval", "plot", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr

"""jobs/eval.py: evaluate a reward model and/or a policy, print a table, write eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.data.schemas import Schema
from rlhf.data.sources import load_source
from rlhf.eval.config import EvalConfig
from rlhf.eval.evaluate import PairScorer, evaluate_policy, evaluate_reward_model
from rlhf.metrics import emit
from rlhf.models import RewardModel, load_policy, load_reward_model
from rlhf.models.scoring import load_implicit_reward


def format_table(results: dict[str, dict]) -> str:
    """One "section  metric  value" line per number, aligned for a terminal."""
    lines = []
    for section, metrics in results.items():
        for name, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{section:<8} {name:<36} {shown:>10}")
    return "\n".join(lines)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    emit(f"wrote {path}")


def _comparison_scorer(cfg: EvalConfig, reward_model: RewardModel | None) -> PairScorer:
    """What scores the comparisons: the reward model, else ``dpo_policy``'s implicit reward
    (``EvalConfig.validate`` makes sure one of them is set)."""
    if reward_model is not None:
        return reward_model
    assert cfg.dpo_policy is not None and cfg.dpo_reference is not None  # EvalConfig.validate
    return load_implicit_reward(cfg.dpo_policy, cfg.dpo_reference, cfg.dpo_beta)


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate what ``cfg`` names; reward-model numbers sit at the top level of eval.json."""
    reward_model = load_reward_model(cfg.reward_model) if cfg.reward_model else None
    results: dict[str, dict] = {}
    if cfg.comparisons is not None:
        comparisons = load_source(cfg.comparisons, Schema.PREFERENCE).table
        scorer = _comparison_scorer(cfg, reward_model)
        results["reward"] = evaluate_reward_model(scorer, comparisons, cfg.batch_size, cfg.reward_head)
    if cfg.references is not None:
        pairs = load_source(cfg.references, Schema.SFT).table
        assert cfg.policy is not None  # EvalConfig.validate: references need a policy
        policy = load_policy(cfg.policy)
        results["policy"], rows = evaluate_policy(policy, pairs, cfg.batch_size, reward_model,
                                                  cfg.reward_head)
        write_jsonl(Path(cfg.output_dir) / "summaries.jsonl", rows)
    emit(format_table(results))
    report = {**results.get("reward", {}), **({"policy": results["policy"]} if "policy" in results else {})}
    path = Path(cfg.output_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    emit(f"wrote {path}")
    return report

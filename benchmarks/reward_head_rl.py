"""What RL does against each head of a length-disentangled reward model (issue 15).

Runs the PPO loop in one process (``LocalRoles``) from one policy, once per estimator x
``reward.head``: ``total`` (quality + length, what the preferences were fitted with) and
``quality`` (the head trained to be uncorrelated with length). Each run's metrics.jsonl, a JSON
summary and one PNG (summary length and raw reward per iteration, a line per run) go to
``--out-dir``. Against ``total`` the summaries should grow; against ``quality`` they should not.

    python benchmarks/reward_head_rl.py --policy runs/sft_tiny/model \\
        --reward-model runs/reward_minilm/model --reward-max-source-length 192 \\
        --prompts ../shared/data/tldr_sft.jsonl --iterations 30 --out-dir benchmarks/results/reward_head_rl
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ENV_DEFAULTS = {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1"}
HEADS = ("total", "quality")
# ppo.advantage -> the settings that make each estimator see 16 summaries per iteration
ESTIMATORS = {
    "gae": ["ppo.rollout_batch_size=16"],
    "grpo": ["ppo.advantage=grpo", "ppo.samples_per_document=4", "ppo.rollout_batch_size=4"],
}


def run(name: str, overrides: list[str], documents: list[str], out_dir: Path) -> list[dict]:
    """One PPO run; its metrics.jsonl rows."""
    import torch

    from rlhf.config.core import load_config
    from rlhf.ppo.config import PPOConfig
    from rlhf.ppo.roles import LocalRoles
    from rlhf.ppo.trainer import PPOTrainer, PromptStream

    torch.manual_seed(0)
    # The run's checkpoint and the version it publishes at its end go to a temporary folder: only
    # its metrics are results.
    scratch = tempfile.TemporaryDirectory(prefix=f"reward-head-rl-{name}-")
    cfg = load_config(PPOConfig, None, [f"output_dir={scratch.name}", *overrides])
    metrics_file = out_dir / name / "metrics.jsonl"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text("")
    rows: list[dict] = []

    def log(metrics) -> None:
        record = metrics.to_record()
        rows.append(record)
        with metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[{name}] iter {record['iteration']}: reward {record['reward_mean']:.3f} length "
              f"{record['response_length_mean']:.1f} kl {record['kl_mean']:.2f}", flush=True)

    roles = LocalRoles(cfg, threads=2)
    stream = PromptStream(lambda epoch: iter(documents))
    with scratch:
        PPOTrainer(cfg, roles, stream, log).run()
    return rows


def plot(results: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in results.items():
        iterations = [r["iteration"] for r in rows]
        style = "-" if name.endswith("total") else "--"
        axes[0].plot(iterations, [r["response_length_mean"] for r in rows], style, label=name)
        axes[1].plot(iterations, [r["reward_mean"] for r in rows], style, label=name)
    for ax, title in zip(axes, ("summary length (tokens)", "raw reward of the optimised head")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="initial policy (an SFT folder)")
    parser.add_argument("--reward-model", required=True, help="a disentangled reward folder (jobs/reward.py)")
    parser.add_argument("--reward-max-source-length", type=int, default=192)
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL with the documents (SFT layout)")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--estimators", nargs="+", choices=sorted(ESTIMATORS), default=["gae", "grpo"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--kl-coef", type=float, default=0.02)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/reward_head_rl"))
    args = parser.parse_args()
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from rlhf.config.sections import DataSourceConfig
    from rlhf.data.schemas import Schema
    from rlhf.data.sources import load_source

    documents = load_source(DataSourceConfig(path=str(args.prompts)), Schema.SFT).table.column(
        "original_text").to_pylist()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common = [f"policy.name_or_path={args.policy}", "policy.max_source_length=256",
              f"policy.max_target_length={args.max_new_tokens}",
              f"reward.model.name_or_path={args.reward_model}",
              f"reward.model.max_source_length={args.reward_max_source_length}",
              f"ppo.iterations={args.iterations}", f"ppo.max_new_tokens={args.max_new_tokens}",
              f"ppo.lr={args.lr}", f"ppo.kl_coef={args.kl_coef}", "ppo.minibatch_size=8",
              "ppo.checkpoint_every=100000", "ppo.publish_every=100000"]  # only at the end
    results, started = {}, time.time()
    for estimator in args.estimators:
        for head in HEADS:
            name = f"{estimator}_{head}"
            overrides = [*common, *ESTIMATORS[estimator], f"reward.head={head}"]
            results[name] = run(name, overrides, documents, args.out_dir)

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    summary = {name: {"length_first3": mean(rows[:3], "response_length_mean"),
                      "length_last3": mean(rows[-3:], "response_length_mean"),
                      "reward_first3": mean(rows[:3], "reward_mean"),
                      "reward_last3": mean(rows[-3:], "reward_mean"),
                      "kl_last3": mean(rows[-3:], "kl_mean")}
               for name, rows in results.items()}
    (args.out_dir / "summary.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "runs": summary,
         "wall_s": time.time() - started}, indent=2) + "\n")
    plot(results, args.out_dir / "length_and_reward.png")
    print("| run | length, first 3 | length, last 3 | reward, first 3 | reward, last 3 | KL, last 3 |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['length_first3']:.1f} | {s['length_last3']:.1f} | {s['reward_first3']:.3f} | "
              f"{s['reward_last3']:.3f} | {s['kl_last3']:.2f} |")


if __name__ == "__main__":
    main()

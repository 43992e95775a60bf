"""Ray Train + DeepSpeed step time against a plain PyTorch loop on the same model and batch.

Also runs 2 Ray Train workers with ZeRO-2 and ZeRO-3 (CPU, gloo) and reports step time and the
peak resident memory of the busiest worker. Every configuration trains SFT on the bundled TL;DR
sample with the same model, micro-batch and sequence lengths; step times skip the first window.

    python benchmarks/train_overhead.py --steps 30 --out benchmarks/results/train_overhead.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlhf.config.core import load_config
from rlhf.data.schemas import Schema
from rlhf.data.sources import load_source
from rlhf.models import load_policy
from rlhf.train.config import SFTConfig
from rlhf.train.sft import SFTTask
from rlhf.train.supervised_loop import LoopSettings, run_training

LOG_EVERY = 5


def base_config(steps: int, output_dir: str, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"output_dir={output_dir}", "model.name_or_path=tiny-t5", "model.max_source_length=512",
        "model.max_target_length=64", "train.batch_size=8", f"train.max_steps={steps}",
        f"train.log_every={LOG_EVERY}", f"train.eval_every={steps}", f"train.save_every={steps}",
        "train.lr_schedule=constant", "rouge_rows=0", "train.max_eval_rows=8", *overrides,
    ])


def plain_loop(cfg: SFTConfig, threads: int) -> dict:
    """The same SFT math in one process: no Ray, no DeepSpeed."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.model)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.train.lr)
    rows = load_source(cfg.data, Schema.SFT).table.to_pydict()
    size = cfg.train.batch_size
    times = []
    for step in range(cfg.train.max_steps):
        start = (step * size) % (len(rows["summary"]) - size)
        t0 = time.perf_counter()
        batch = policy.encode_pairs(rows["original_text"][start:start + size],
                                    rows["summary"][start:start + size])
        loss = policy.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"step_time_s": statistics.mean(times[LOG_EVERY:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ray_train(cfg: SFTConfig) -> dict:
    train = load_source(cfg.data, Schema.SFT).table
    task = SFTTask(cfg.model, cfg.train.batch_size, 0, cfg.train.deepspeed.zero_stage)
    settings = LoopSettings(train=cfg.train, seed=cfg.seed, output_dir=cfg.output_dir)
    t0 = time.perf_counter()
    result = run_training(task, settings, train, train.slice(0, 8))
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in result.metrics_path.open()]
    windows = [r for r in records if r["event"] == "train"][1:]  # first window = warm-up
    return {"step_time_s": statistics.mean(r["step_time_s"] for r in windows),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in windows), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/train_overhead.json")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="rlhf-bench-")
    results = {}
    results["plain_1thread"] = plain_loop(base_config(args.steps, tmp), threads=1)
    results["ray_train_1worker"] = ray_train(base_config(args.steps, f"{tmp}/r1"))
    for stage in (2, 3):
        results[f"ray_train_2workers_zero{stage}"] = ray_train(base_config(
            args.steps, f"{tmp}/z{stage}", "train.num_workers=2", f"train.deepspeed.zero_stage={stage}"))
    results["ratio_ray_train_1worker_vs_plain"] = (
        results["ray_train_1worker"]["step_time_s"] / results["plain_1thread"]["step_time_s"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

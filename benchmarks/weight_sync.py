"""Weight-sync time from learner rank 0 to the rollout workers: object store vs collective.

Runs the product path: ``RayRoles`` on a private ``ray.init`` with the rule-based reward, then
``roles.sync()`` after every policy tensor of the learner was changed in place (what a full
fine-tuning step does). A sync moves the trainable parameters (here all of them) with no
change check: nothing is copied to compare against.
On CPU the collective is gloo; on GPU (``--gpu``) it is NCCL with one GPU per actor.

Models are random-weight GPT-2s from ``benchmarks/architectures.py``: ``tiny-gpt2`` (the PPO
anchor's 2 layers, n_embd 128) and ``gpt2-125m`` (GPT-2 small's 12 layers, n_embd 768,
vocabulary 50,257, 1,024 positions: 124M parameters, 0.5 GB in fp32). Times are medians over
``--repeats`` syncs, taken on the driver (wall) and on learner rank 0 (the gather and send, as
the PPO metrics report it).

    python benchmarks/weight_sync.py --out benchmarks/results/weight_sync.json  # both sizes, 1 and 2 workers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import ray
import torch
from architectures import ARCHITECTURES, save_random

from rlhf.config.core import load_config
from rlhf.ppo.actors import RayRoles
from rlhf.ppo.config import PPOConfig


def perturb(learner, scale: float) -> None:
    """Change every trainable policy tensor of a learner in place, as an optimizer step would
    (all of them in a full fine-tune, the adapters alone with LoRA)."""
    def step(role, scale: float) -> None:
        with torch.no_grad():
            for p in role.policy.model.parameters():
                if p.requires_grad:
                    p.add_(scale)
    ray.get(learner.__ray_call__.remote(step, scale))


def measure(policy: Path, transport: str, workers: int, repeats: int, gpu: bool, lora_r: int = 0) -> dict:
    cfg = load_config(PPOConfig, None, [
        f"output_dir={tempfile.mkdtemp()}", f"policy.name_or_path={policy}",
        "reward.fn=rlhf.ppo.rewards:brevity", f"roles.rollout_workers={workers}",
        f"roles.weight_sync={transport}", "roles.cpus_per_actor=0.25",
        f"roles.gpus_per_actor={1 if gpu else 0}", f"lora.r={lora_r}",
    ])
    roles = RayRoles(cfg)
    try:
        changed_wall, changed_rank0, sent = [], [], set()
        for i in range(repeats):
            perturb(roles.learners[0], 1e-3 * (i + 1))
            start = time.perf_counter()
            report = roles.sync()
            changed_wall.append(time.perf_counter() - start)
            changed_rank0.append(report.seconds)
            sent.add(report.bytes)
        rss = ray.get(roles.learners[0].__ray_call__.remote(lambda role: psutil.Process().memory_info().rss))
    finally:
        roles.shutdown()
    (sync_bytes,) = sent  # every sync after the first moves the same tensors
    return {"transport": transport, "workers": workers, "lora_r": lora_r, "learner_rss_mb": rss / 2**20,
            "changed_wall_s": statistics.median(changed_wall),
            "changed_rank0_s": statistics.median(changed_rank0), "sync_bytes": sync_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny-gpt2", "gpt2-125m"],
                        choices=sorted(ARCHITECTURES))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora", nargs="+", type=int, default=[0],
                        help="adapter ranks to measure (0 = full fine-tune), e.g. --lora 0 8")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor; the collective is NCCL")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    actors = 3 + max(args.workers)
    ray.init(address="local", num_cpus=max(2, actors), num_gpus=None if args.gpu else 0,
             include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            policy, parameters = save_random(size, Path(folder))
            for workers in args.workers:
                for transport in ("object_store", "collective"):
                    for lora_r in args.lora:
                        row = {"size": size, "parameters": parameters,
                               **measure(policy, transport, workers, args.repeats, args.gpu, lora_r)}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    ray.shutdown()
    result = {"rows": rows, "machine": platform.platform(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "ray": ray.__version__, "gpu": args.gpu,
              "loadavg_end": os.getloadavg()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

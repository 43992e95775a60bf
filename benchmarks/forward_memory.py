"""Peak memory of one reference forward as the rollout grows, with and without ``roles.forward_batch_size``.

Each point runs in a fresh process (peak RSS only grows), on tiny-led with long documents, so the
activations of one pass dominate: a role whose forward is micro-batched should stay flat.

    python benchmarks/forward_memory.py [--rows 8 16 32] [--chunk 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_TOKENS, RESPONSE_TOKENS = 1024, 64


def measure(rows: int, forward_batch_size: int) -> dict:
    """One ReferenceScorer.logprobs call in this process: RSS before/after (MiB) and a checksum."""
    import torch

    from rlhf.config.core import load_config
    from rlhf.ppo.config import PPOConfig
    from rlhf.ppo.experience import Rollout
    from rlhf.ppo.roles import ReferenceScorer

    cfg = load_config(PPOConfig, None, [
        "policy.name_or_path=tiny-led", f"policy.max_source_length={SOURCE_TOKENS}",
        f"policy.max_target_length={RESPONSE_TOKENS}", f"roles.forward_batch_size={forward_batch_size}",
    ])
    reference = ReferenceScorer(cfg)
    documents = [f"my landlord kept the deposit and the flat had mould {i} " * 30 for i in range(rows)]
    query = {name: t.cpu() for name, t in reference.policy.encode_documents(documents).items()}
    responses = torch.randint(3, 300, (rows, RESPONSE_TOKENS), generator=torch.Generator().manual_seed(0))
    rollout = Rollout(documents, [""] * rows, query, responses, torch.ones(rows, RESPONSE_TOKENS),
                      torch.zeros(rows, dtype=torch.bool), 0, "right")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logprobs = reference.logprobs(rollout)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "forward_batch_size": forward_batch_size,
            "source_tokens": query["input_ids"].shape[1], "rss_before_mib": round(before),
            "peak_increase_mib": round(after - before),
            "logprob_sum": round(float(logprobs.sum()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--chunk", type=int, default=8, help="forward_batch_size to compare with 0")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "forward_memory.json")
    parser.add_argument("--point", type=int, nargs=2, help=argparse.SUPPRESS)  # rows, size (child)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(*args.point)))
        return
    results = []
    for rows in args.rows:
        for size in (0, args.chunk):
            done = subprocess.run([sys.executable, __file__, "--point", str(rows), str(size)],
                                  capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

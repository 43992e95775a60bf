"""Peak memory of the reference, reward and learner forwards as the rollout grows, with and
without ``roles.forward_batch_size``.

Each point runs in a fresh process (peak RSS only grows), on tiny-led with long documents, so the
activations of one pass dominate: a role whose forward is micro-batched should stay flat. The
reference is ``ReferenceScorer.logprobs``, the reward ``RewardScorer.score`` (tiny-led backbone
with a scalar head), the learner ``Learner.evaluate`` (old log-probs and values).

    python benchmarks/forward_memory.py [--roles reference reward learner] [--rows 4 8 16] [--chunk 4]
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


def measure(role: str, rows: int, forward_batch_size: int) -> dict:
    """One forward call of ``role`` in this process: peak RSS and its increase (MiB), a checksum."""
    import torch

    from rlhf.config.core import load_config
    from rlhf.ppo.config import PPOConfig
    from rlhf.ppo.experience import Rollout
    from rlhf.ppo.roles import Learner, ReferenceScorer, RewardScorer

    lengths = [f"{model}.max_source_length={SOURCE_TOKENS}" for model in ("policy", "reward.model")]
    cfg = load_config(PPOConfig, None, [
        "policy.name_or_path=tiny-led", "reward.model.name_or_path=tiny-led", *lengths,
        f"policy.max_target_length={RESPONSE_TOKENS}", f"roles.forward_batch_size={forward_batch_size}",
    ])
    reference = ReferenceScorer(cfg)
    run = {"reference": lambda rollout: reference.logprobs(rollout),
           "reward": lambda rollout: RewardScorer(cfg).score(rollout.documents, rollout.summaries)[0],
           "learner": lambda rollout: Learner(cfg).evaluate(rollout)[0]}[role]
    documents = [f"my landlord kept the deposit and the flat had mould {i} " * 30 for i in range(rows)]
    query = {name: t.cpu() for name, t in reference.policy.encode_documents(documents).items()}
    responses = torch.randint(3, 300, (rows, RESPONSE_TOKENS), generator=torch.Generator().manual_seed(0))
    summaries = reference.policy.tokenizer.batch_decode(responses, skip_special_tokens=True)
    rollout = Rollout(documents, summaries, query, responses, torch.ones(rows, RESPONSE_TOKENS),
                      torch.zeros(rows, dtype=torch.bool), 0, "right")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    output = run(rollout)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"role": role, "rows": rows, "forward_batch_size": forward_batch_size,
            "source_tokens": query["input_ids"].shape[1], "peak_rss_mib": round(after),
            "peak_increase_mib": round(after - before), "checksum": round(float(output.sum()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", nargs="+", default=["reference", "reward", "learner"])
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--chunk", type=int, default=4, help="forward_batch_size to compare with 0")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "forward_memory.json")
    parser.add_argument("--point", nargs=3, help=argparse.SUPPRESS)  # role, rows, size (child)
    args = parser.parse_args()
    if args.point:
        role, rows, size = args.point
        print(json.dumps(measure(role, int(rows), int(size))))
        return
    results = []
    for role in args.roles:
        for rows in args.rows:
            for size in (0, args.chunk):
                done = subprocess.run([sys.executable, __file__, "--point", role, str(rows), str(size)],
                                      capture_output=True, text=True, check=True)
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(results[-1], flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

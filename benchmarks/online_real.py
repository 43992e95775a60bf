"""The online loop end to end on a real model (SmolLM2-135M, issue 27), measured on a 2-core CPU.

    python benchmarks/online_real.py --workdir runs/online_real --cycles 2 --min-new 48 \\
        --out benchmarks/results/real_model/online.json

In one local Ray instance: the SFT policy (configs/sft_smollm.yaml) is published as v0001, Serve
answers over HTTP, a simulated person asks /v1/compare for posts of the chain's training part and
answers /v1/feedback by a content rule that length cannot explain (``post_overlap`` of
benchmarks/active_selection.py: the summary whose content words come more from the post wins; ties
by a coin; each choice flipped with probability --noise), and the online loop
(configs/online_smollm.yaml: reward-model update from the MiniLM reward model, then GRPO with LoRA,
the publish guard) runs --cycles cycles. The person answers --min-new choices per cycle and waits
while a cycle trains (two cores). At the end, on --probe held-out posts: the person's win rate of
the last published version over v0001 (one sampled summary each, as /v1/compare shows them) and the
length ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import threading
import time
from pathlib import Path

import requests
from active_selection import content_words, overlap_share

ENV_DEFAULTS = {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROOT = Path(__file__).resolve().parents[1]
POSTS = "../shared/data/tldr_sft.jsonl"


def prefers(post: str, summaries: list[str], noise: float, rng: random.Random) -> int:
    """The person's choice of two summaries of ``post`` (``post_overlap``, coin on ties, noise flips)."""
    words = frozenset(content_words(post))
    a, b = (overlap_share(s, words) for s in summaries)
    choice = rng.random() < 0.5 if a == b else b > a
    return int(choice) ^ int(rng.random() < noise)


class Person(threading.Thread):
    """Answers /v1/compare pairs by ``prefers`` until ``allowed`` choices, then waits for more."""

    def __init__(self, url: str, posts: list[str], noise: float, seed: int):
        super().__init__(daemon=True)
        self.url, self.posts, self.noise = url, posts, noise
        self.rng = random.Random(seed)
        self.allowed = self.answered = 0
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            if self.answered >= self.allowed:
                time.sleep(0.5)
                continue
            post = self.rng.choice(self.posts)
            shown = requests.post(self.url + "/v1/compare", json={"text": post}, timeout=600)
            if shown.status_code != 200:
                self.errors.append(shown.text[:200])
                continue
            body = shown.json()
            choice = prefers(post, body["summaries"], self.noise, self.rng)
            answer = requests.post(self.url + "/v1/feedback", timeout=120,
                                   json={"comparison_id": body["comparison_id"], "choice": choice})
            answer.raise_for_status()
            self.answered += 1


def posts(part: str, limit: int | None = None) -> list[str]:
    from rlhf.config.sections import DataSourceConfig
    from rlhf.data.schemas import Schema
    from rlhf.data.sources import load_source

    source = DataSourceConfig(path=POSTS, holdout_share=0.1, part=part, limit=limit)
    return load_source(source, Schema.PROMPTS).table.column("original_text").to_pylist()


def probe(registry: Path, last: str, documents: list[str], noise: float, seed: int) -> dict:
    """The person's win rate of ``last`` over v0001 on ``documents``, and the length ratio."""
    import torch

    from rlhf.config.sections import ModelConfig
    from rlhf.models import load_policy

    summaries = {}
    for version in ("v0001", last):
        policy = load_policy(ModelConfig(name_or_path=str(registry / version), max_source_length=256,
                                         max_target_length=48))
        torch.manual_seed(seed)
        summaries[version] = [s for i in range(0, len(documents), 20) for s in policy.generate(
            documents[i:i + 20], do_sample=True, temperature=1.0, top_p=0.95)]
    rng = random.Random(seed)
    wins = [prefers(d, [a, b], noise, rng) for d, a, b in zip(documents, summaries["v0001"], summaries[last])]
    words = {v: statistics.mean(len(s.split()) for s in texts) for v, texts in summaries.items()}
    return {"pairs": len(documents), "version": last, "win_rate_over_v0001": statistics.mean(wins),
            "length_ratio": words[last] / words["v0001"], "words_mean": words,
            "samples": [{"post": d[:300], "v0001": a, last: b}
                        for d, a, b in list(zip(documents, summaries["v0001"], summaries[last]))[:5]]}


def start(args: argparse.Namespace) -> tuple[str, Path]:
    """Ray, a registry whose v0001 is the SFT policy, and the Serve app; the app's URL and registry."""
    import ray

    from rlhf.config.core import load_config
    from rlhf.registry import PolicyRegistry
    from rlhf.serve.app import start_app
    from rlhf.serve.config import ServeConfig

    ray.init(address="local", num_cpus=8, include_dashboard=False)  # logical CPUs: two real cores
    registry = args.workdir / "registry"
    PolicyRegistry(registry).publish(lambda path: shutil.copytree(args.policy, path, dirs_exist_ok=True),
                                     {"iteration": 0})
    cfg = load_config(ServeConfig, None, [
        f"registry={registry}", f"store.url=sqlite:///{args.workdir / 'feedback.db'}",
        f"output_dir={args.workdir / 'serve'}", f"serve.port={args.port}", "serve.max_new_tokens=48",
        "serve.threads_per_replica=2", "policy.max_source_length=256", "policy.max_target_length=48",
    ])
    os.environ.setdefault(cfg.serve.admin_token_env, "online-real-benchmark-admin-token-0123456789")
    return start_app(cfg), registry


def main() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--policy", default="runs/sft_smollm/model")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--min-new", type=int, default=48)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--probe", type=int, default=200)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    from rlhf.cli import prepare_models
    from rlhf.config.core import load_config
    from rlhf.online.config import OnlineConfig
    from rlhf.online.loop import run_online

    url, registry = start(args)
    person = Person(url, posts("rest"), args.noise, args.seed)
    person.start()
    cfg = load_config(OnlineConfig, str(ROOT / "configs" / "online_smollm.yaml"), [
        f"output_dir={args.workdir / 'online'}", f"registry={registry}", f"cycles={args.cycles}",
        f"store.url=sqlite:///{args.workdir / 'feedback.db'}", f"feedback.min_new={args.min_new}",
    ])
    prepare_models(cfg)  # as jobs/online.py does: Ray Train workers need absolute model folders
    started = time.time()
    for cycle in range(args.cycles):  # one at a time: the person answers while no cycle trains
        person.allowed += args.min_new
        cfg.cycles = cycle + 1
        run_online(cfg)
    person.stop.set()
    ledger = (args.workdir / "online" / "cycles.jsonl").read_text().splitlines()
    cycles = [json.loads(line) for line in ledger]
    last = sorted(p.name for p in registry.iterdir() if p.name.startswith("v"))[-1]
    report = {"cycles": args.cycles, "min_new": args.min_new, "noise": args.noise,
              "answered": person.answered, "person_errors": person.errors[:5],
              "loop_s": round(time.time() - started), "published": last,
              "probe": probe(registry, last, posts("holdout", args.probe), args.noise, args.seed),
              "cycle_records": cycles}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "cycle_records"}, indent=2, default=str))


if __name__ == "__main__":
    main()

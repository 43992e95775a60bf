"""Full PPO iterations on one GPU with every role colocated, split by role, plus plain generate.

The product path without Ray (the GPU machine has no Ray wheel): ``LocalRoles`` puts the
generator, reward model, reference and the DeepSpeed learner (bf16) in this process on the one
GPU, and ``PPOTrainer.step`` runs generate -> score -> reference -> learn -> sync. Policy, reward
model and value model are random-weight checkpoints of the real architecture's config
(``benchmarks/architectures.py``): ``led-base`` (LED-base-16384, 16k-token documents) or
``gpt2-125m``. Generation samples exactly ``--new-tokens`` tokens (EOS does not stop it), so tokens/s
compares like for like with a plain ``model.generate`` call on the same model, batch and settings.

    python benchmarks/gpu/ppo_iteration.py --arch led-base --source-tokens 16384 --out results/gpu_ppo.jsonl
    python benchmarks/gpu/ppo_iteration.py --arch gpt2-125m --source-tokens 512 --out results/gpu_ppo.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from architectures import save_random  # noqa: E402
from gpu_common import device_report, emit, peak_memory_gib, reset_peak_memory  # noqa: E402

from rlhf.config.core import load_config  # noqa: E402
from rlhf.config.sections import ModelConfig  # noqa: E402
from rlhf.models import Policy, load_reward_model  # noqa: E402
from rlhf.ppo.config import PPOConfig  # noqa: E402
from rlhf.ppo.roles import LocalRoles  # noqa: E402
from rlhf.ppo.trainer import PPOTrainer, PromptStream  # noqa: E402

# IterationMetrics fields, read with getattr: a renamed field is an AttributeError
ROLE_KEYS = ("time_generate_s", "time_score_s", "time_reference_s", "time_learn_s", "time_sync_s")


def documents(n: int, tokens: int) -> list[str]:
    """``n`` distinct documents of exactly ``tokens`` byte-level tokens, EOS included."""
    text = "the proposed estimator is unbiased and its variance shrinks with the sample size. "
    return [(f"paper {i}: " + text * (tokens // len(text) + 1))[: tokens - 1] for i in range(n)]


def plain_generate_tokens_per_s(policy: Policy, docs: list[str], new_tokens: int, repeats: int) -> float:
    """Sampled tokens/s of ``model.generate`` alone, with the settings the rollout uses."""
    inputs = {k: v.to(policy.model.device) for k, v in policy.encode_documents(docs).items()}
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if policy.model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            policy.model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=policy.tokenizer.pad_token_id,
                                  logits_processor=policy.logits_processors())
        if policy.model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return len(docs) * new_tokens / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="led-base", help="see benchmarks/architectures.py")
    parser.add_argument("--source-tokens", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rollout-batch", type=int, default=8)
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append the result as one JSON line")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    folder = Path(tempfile.mkdtemp(prefix="gpu-ppo-"))
    policy_dir, parameters = save_random(args.arch, folder)
    reward_dir = folder / "reward"
    load_reward_model(ModelConfig(name_or_path=str(policy_dir))).save(reward_dir)
    never = args.warmup + args.iters + 1000
    cfg = load_config(PPOConfig, None, [
        f"output_dir={folder / 'run'}", f"policy.name_or_path={policy_dir}",
        f"policy.max_source_length={args.source_tokens}", f"policy.max_target_length={args.new_tokens}",
        "policy.gradient_checkpointing=true", "reward.fn=", f"reward.model.name_or_path={reward_dir}",
        f"reward.model.max_source_length={args.source_tokens}",
        f"reward.model.max_target_length={args.new_tokens + 1}", "reward.normalize=false",
        f"ppo.rollout_batch_size={args.rollout_batch}", f"ppo.minibatch_size={args.minibatch}",
        f"ppo.epochs={args.epochs}", f"ppo.max_new_tokens={args.new_tokens}", "ppo.stop_at_eos=false",
        f"ppo.iterations={args.warmup + args.iters}", f"ppo.checkpoint_every={never}",
        f"ppo.publish_every={never}", f"roles.gpus_per_actor={1 if gpu else 0}",
        f"roles.deepspeed.zero_stage={args.zero}",
    ])
    docs = documents(args.rollout_batch * (args.warmup + args.iters), args.source_tokens)
    reset_peak_memory(device)
    roles = LocalRoles(cfg, threads=torch.get_num_threads())
    trainer = PPOTrainer(cfg, roles, PromptStream(lambda epoch: iter(docs)), log=lambda record: None)
    records = []
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        metrics = trainer.step()
        if i >= args.warmup:
            records.append({"wall_s": time.perf_counter() - start,
                            **{k: getattr(metrics, k) for k in ROLE_KEYS},
                            "generate_tokens_per_s": metrics.generate_tokens_per_s})
    median = {k: statistics.median(r[k] for r in records) for k in records[0]}
    plain = plain_generate_tokens_per_s(roles.generator.policy, docs[: args.rollout_batch],
                                        args.new_tokens, repeats=3)
    result = {"arch": args.arch, "parameters": parameters, "source_tokens": args.source_tokens,
              "new_tokens": args.new_tokens, "rollout_batch": args.rollout_batch,
              "minibatch": args.minibatch, "epochs": args.epochs, "zero": args.zero,
              "iterations": len(records), **{f"median_{k}": v for k, v in median.items()},
              "plain_generate_tokens_per_s": plain,
              "rollout_vs_plain_generate": median["generate_tokens_per_s"] / plain,
              "peak_memory_gib": peak_memory_gib(device), **device_report()}
    emit(result, args.out)


if __name__ == "__main__":
    main()

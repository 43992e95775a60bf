#!/usr/bin/env python
"""TRL's PPOTrainer (0.28, the last release with one) on a real SmolLM2-135M-Instruct, CPU: seconds per step.

Runs in TRL 0.28's own venv (``/tmp/trl``: ``pip install torch==2.13.0 trl==0.28.0``), never imports
``rlhf``; ``benchmarks/ppo_real.py --config trl`` starts it. Every number is a flag with its default.

  policy   the fp32 SmolLM2-135M-Instruct folder that ``../shared/bench/trl_grpo_anchor.py`` (or our
           ``rlhf.models.offline``) converts once (--model-cache); reference = a second copy of it.
  reward   ``LlamaForSequenceClassification`` from the same weights with a 1-output score head (seed 42),
           saved once as its own folder (--reward-cache); the value model is a second copy of it, as
           TRL's examples start the critic from the reward model.
  prompts  --prompts-per-step TL;DR posts per step in file order, each cut to exactly 192 tokens +
           "\\nTL;DR:" (197 tokens, no padding; checked), one summary each.
  rollout  exactly --new-tokens new tokens (EOS masked until then), T=1, top_k=0, top_p=1, one
           ``generate`` over the whole batch (local_rollout_forward_batch_size = prompts per step).
  update   num_ppo_epochs=1, num_mini_batches=1: one AdamW step per rollout over micro-batches of
           --micro-batch rows (gradient accumulation); KL (k1, coef 0.05) in the reward, GAE gamma 1,
           lam 0.95, vf_coef 0.1, clip 0.2 / value clip 0.2, whitened advantages, fp32, 2 threads.

Step time = wall time between consecutive ``on_step_end`` callbacks, first --warmup steps dropped. Split
by wrapping TRL's module-level helpers: generate (``batch_generation``), score (policy log-probs,
reference, value and reward forwards, GAE), train (the micro-batch forward+backward passes and AdamW).
"""

import argparse
import os

parser = argparse.ArgumentParser()
for name, default in [("threads", 2), ("warmup", 1), ("iters", 3), ("prompts-per-step", 32),
                      ("new-tokens", 48), ("prompt-tokens", 192), ("micro-batch", 8), ("lr", 1e-6),
                      ("kl-coef", 0.05), ("seed", 42)]:
    parser.add_argument("--" + name, type=type(default), default=default)
parser.add_argument("--model-cache", default="/tmp/smollm2-135m-hf")
parser.add_argument("--reward-cache", default="/tmp/smollm2-135m-reward")
parser.add_argument("--data", required=True, help="tldr_sft.jsonl (posts under 'post')")
parser.add_argument("--workdir", default="/tmp/trl_ppo_real_out")
parser.add_argument("--out", required=True, help="result JSON")
ARGS = parser.parse_args()
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(ARGS.threads)
for key, value in [("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                   ("TRANSFORMERS_OFFLINE", "1"), ("WANDB_DISABLED", "true"), ("CUDA_VISIBLE_DEVICES", "")]:
    os.environ.setdefault(key, value)

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)

warnings.filterwarnings("ignore", category=FutureWarning)
SUFFIX = "\nTL;DR:"


def ensure_reward_folder(policy_folder: str, reward_folder: str) -> None:
    """The reward/value starting point: the policy's weights under a seeded 1-output score head."""
    if os.path.exists(os.path.join(reward_folder, "config.json")):
        return
    tokenizer = AutoTokenizer.from_pretrained(policy_folder)
    torch.manual_seed(ARGS.seed)
    model = AutoModelForSequenceClassification.from_pretrained(policy_folder, num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    partial = reward_folder + ".partial"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.rename(partial, reward_folder)


def build_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first n posts (file order) of >= 192 tokens, cut to 192 + SUFFIX, as token ids (197 each)."""
    want = ARGS.prompt_tokens + len(tokenizer(SUFFIX)["input_ids"])
    prompts = []
    with open(ARGS.data) as lines:
        for line in lines:
            ids = tokenizer(json.loads(line)["post"])["input_ids"]
            encoded = tokenizer(tokenizer.decode(ids[: ARGS.prompt_tokens]) + SUFFIX)["input_ids"]
            if len(ids) >= ARGS.prompt_tokens and len(encoded) == want:
                prompts.append(encoded)
            if len(prompts) == n:
                return prompts
    raise SystemExit(f"only {len(prompts)} usable posts in {ARGS.data}, need {n}")


def summarize(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": statistics.fmean(xs), "median": statistics.median(xs), "min": min(xs),
            "max": max(xs)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from trl.trainer.ppo_config import PPOConfig
    from trl.trainer.ppo_trainer import PPOTrainer

    ensure_reward_folder(ARGS.model_cache, ARGS.reward_cache)
    steps = ARGS.warmup + ARGS.iters
    tokenizer = AutoTokenizer.from_pretrained(ARGS.model_cache)
    prompts = build_prompts(tokenizer, ARGS.prompts_per_step * steps)
    transformers.set_seed(ARGS.seed)

    def causal():
        return AutoModelForCausalLM.from_pretrained(ARGS.model_cache, dtype=torch.float32)

    def scorer():
        return AutoModelForSequenceClassification.from_pretrained(ARGS.reward_cache, dtype=torch.float32)

    policy, reference, reward_model, value_model = causal(), causal(), scorer(), scorer()
    config = PPOConfig(
        output_dir=ARGS.workdir, per_device_train_batch_size=ARGS.micro_batch,
        gradient_accumulation_steps=ARGS.prompts_per_step // ARGS.micro_batch, num_mini_batches=1,
        num_ppo_epochs=1, local_rollout_forward_batch_size=ARGS.prompts_per_step,
        total_episodes=ARGS.prompts_per_step * steps, response_length=ARGS.new_tokens, stop_token=None,
        stop_token_id=None, temperature=1.0, missing_eos_penalty=None, kl_coef=ARGS.kl_coef,
        kl_estimator="k1", gamma=1.0, lam=0.95, vf_coef=0.1, cliprange=0.2, cliprange_value=0.2,
        whiten_rewards=False, learning_rate=ARGS.lr, bf16=False, fp16=False, use_cpu=True,
        num_sample_generations=0, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=ARGS.seed,
    )
    now: dict = {}
    records: list[dict] = []
    plain_generation = ppo_module.batch_generation

    def timed_generation(model, queries, batch_size, pad_token_id, generation_config):
        generation_config.min_new_tokens = ARGS.new_tokens  # exactly --new-tokens: EOS masked until then
        start = time.perf_counter()
        result = plain_generation(model, queries, batch_size, pad_token_id, generation_config)
        now["generate"] = (start, time.perf_counter())
        now["response_shape"] = list(result[0][:, queries.shape[1]:].shape)
        return result

    ppo_module.batch_generation = timed_generation
    plain_forward = ppo_module.forward

    def timed_forward(model, query_responses, pad_token_id):
        if torch.is_grad_enabled():  # the first forward with gradients starts the update
            now.setdefault("train_start", time.perf_counter())
            now["train_forwards"] = now.get("train_forwards", 0) + 1
        return plain_forward(model, query_responses, pad_token_id)

    ppo_module.forward = timed_forward

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            now.clear()
            now["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            end = time.perf_counter()
            generate_start, generate_end = now["generate"]
            records.append({
                "step_s": end - now["begin"], "generate_s": generate_end - generate_start,
                "score_s": now["train_start"] - generate_end, "train_s": end - now["train_start"],
                "train_forwards": now["train_forwards"], "response_shape": now["response_shape"],
                "peak_rss_mb": peak_rss_mb(),
            })
            print("STEP " + json.dumps(records[-1]), flush=True)
            now.clear()
            now["begin"] = time.perf_counter()

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward_model, value_model=value_model,
                         train_dataset=Dataset.from_dict({"input_ids": prompts}),
                         eval_dataset=Dataset.from_dict({"input_ids": prompts[:2]}), callbacks=[StepTimer()])
    trainer.train()
    assert len(records) == steps, (len(records), steps)
    for record in records:
        assert record["response_shape"] == [ARGS.prompts_per_step, ARGS.new_tokens], record
        assert record["train_forwards"] == ARGS.prompts_per_step // ARGS.micro_batch, record
    measured = records[ARGS.warmup:]
    result = {
        "config": "trl", "trl": trl.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(ARGS),
        **{key: summarize([r[key] for r in measured])
           for key in ("step_s", "generate_s", "score_s", "train_s")},
        "warmup_step_s": [r["step_s"] for r in records[: ARGS.warmup]], "peak_rss_mb": peak_rss_mb(),
        "records": records,
    }
    with open(ARGS.out, "w") as out:
        out.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

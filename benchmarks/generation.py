"""Rollout generation on a real SmolLM2-135M-Instruct against this machine's floor, CPU.

The GRPO benchmark's rollout (``benchmarks/grpo_real.py``): 8 TL;DR posts of 197 prompt tokens, 4
samples each (batch 32), exactly 48 new tokens, T=1, fp32, 2 threads. Each variant is timed
``--repeats`` times after one warm-up call, in one process, back to back:

* ``hf_generate``   -- plain ``model.generate`` on the 32 rows (dynamic KV cache): what TRL runs.
* ``hf_static``     -- the same with ``cache_implementation="static"`` (preallocated KV cache).
* ``ours_unshared`` -- ``generate_rollout(share_prompts=False)``: every row prefills its own prompt.
* ``ours``          -- ``generate_rollout``: each distinct prompt prefilled once, its KV cache
  indexed out to its 4 rows (``rlhf.ppo.experience.shared_prompt_inputs``).
* ``floor``         -- what the model's own forward passes cost with no generation loop around
  them: one prefill of the 8 distinct prompts + 48 x one cached decode step at batch 32
  (each measured, the decode step at the mid-response cache length).

``--compile`` adds ``hf_static_compiled`` (``torch.compile`` of the forward, static cache); the
compile itself is reported apart and not in the timed calls.

    python benchmarks/generation.py --out benchmarks/results/generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_real import GROUP, MODEL_CACHE, NEW_TOKENS, PROMPTS_PER_STEP, THREADS, build_documents  # noqa: E402
from ppo_iteration import ENV_DEFAULTS, loadavg, peak_rss_mb, summarize, versions  # noqa: E402


def timed(call, repeats: int) -> list[float]:
    call()  # warm-up: allocator, thread pool, caches
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the decode step")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generation.json"))
    args = parser.parse_args()
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)

    import torch

    from rlhf.config.sections import ModelConfig
    from rlhf.models import load_policy
    from rlhf.models.heads import positions_from_mask
    from rlhf.ppo.experience import generate_rollout

    torch.set_num_threads(THREADS)
    load_before = loadavg()
    policy = load_policy(ModelConfig(name_or_path=str(MODEL_CACHE), max_source_length=256,
                                     max_target_length=NEW_TOKENS), dropout=False)
    model = policy.model.eval()
    documents = build_documents(policy.tokenizer, PROMPTS_PER_STEP)
    rows = [document for document in documents for _ in range(GROUP)]
    inputs = policy.encode_documents(rows)  # (32, 197), no padding
    assert list(inputs["input_ids"].shape) == [PROMPTS_PER_STEP * GROUP, 197]
    plain = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": NEW_TOKENS,
             "min_new_tokens": NEW_TOKENS, "pad_token_id": policy.tokenizer.pad_token_id}

    def hf_generate(**extra):
        def call():
            with torch.no_grad():
                out = model.generate(**inputs, **plain, **extra)
            assert out.shape[1] == 197 + NEW_TOKENS
        return call

    def ours(share: bool):
        def call():
            rollout = generate_rollout(policy, rows, max_new_tokens=NEW_TOKENS, stop_at_eos=False,
                                       share_prompts=share)
            assert rollout.response_ids.shape == (32, NEW_TOKENS)
        return call

    # the floor's two pieces
    distinct = policy.encode_documents(documents)  # (8, 197)

    @torch.no_grad()
    def prefill():
        model(**distinct, position_ids=positions_from_mask(distinct["attention_mask"]), use_cache=True,
              logits_to_keep=1)

    with torch.no_grad():
        cache = model(**inputs, use_cache=True, logits_to_keep=1).cache  # batch 32, 197 cached
        mid = NEW_TOKENS // 2
        filler = torch.randint(0, 1000, (32, mid))
        model(input_ids=filler, cache=cache, use_cache=True, logits_to_keep=1)  # cache at 197 + 24
    length = cache.get_seq_length()
    token = torch.randint(0, 1000, (32, 1))
    positions = torch.full((32, 1), length)

    @torch.no_grad()
    def decode_step():
        model(input_ids=token, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache.crop(-1)  # back to the mid-response length: every call sees the same cache

    variants = {"hf_generate": hf_generate(), "hf_static": hf_generate(cache_implementation="static"),
                "ours_unshared": ours(False), "ours": ours(True)}
    results: dict[str, dict] = {}
    for name, call in variants.items():
        torch.manual_seed(0)
        results[name] = summarize(timed(call, args.repeats))
        print(f"{name}: {results[name]['mean']:.2f} s", flush=True)
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=False)
        start = time.perf_counter()
        static = hf_generate(cache_implementation="static")
        static()
        compile_s = time.perf_counter() - start
        compiled = results["hf_static_compiled"] = summarize(timed(static, args.repeats))
        compiled["first_call_s"] = compile_s
        print(f"hf_static_compiled: {compiled['mean']:.2f} s (first call {compile_s:.0f} s)")
    prefill_s = summarize(timed(prefill, args.repeats))
    step_s = summarize(timed(decode_step, 5 * args.repeats))
    floor = prefill_s["mean"] + NEW_TOKENS * step_s["mean"]
    tokens = 32 * NEW_TOKENS
    report = {
        "versions": versions(), "threads": torch.get_num_threads(), "batch": 32, "prompt_tokens": 197,
        "new_tokens": NEW_TOKENS, "repeats": args.repeats, "variants": results,
        "floor": {"prefill_8_prompts_s": prefill_s, "decode_step_batch_32_s": step_s, "total_s": floor},
        "tokens_per_s": {name: tokens / r["mean"] for name, r in results.items()} | {"floor": tokens / floor},
        "vs_floor": {name: r["mean"] / floor for name, r in results.items()},
        "peak_rss_mb": peak_rss_mb(), "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| variant | s per rollout | tokens/s | x floor |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mean']:.2f} | {tokens / r['mean']:.0f} | {r['mean'] / floor:.2f} |")
    print(f"| floor (prefill {prefill_s['mean']:.2f} s + 48 x {step_s['mean'] * 1000:.0f} ms) | "
          f"{floor:.2f} | {tokens / floor:.0f} | 1.00 |")


if __name__ == "__main__":
    main()

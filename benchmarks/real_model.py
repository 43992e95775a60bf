"""Measurements of the real-model chain (SmolLM2-135M-Instruct on TL;DR; docs/benchmarks.md).

    # zero-shot prompt formats: "post\\nTL;DR:" (what the chain trains) against the chat template
    python benchmarks/real_model.py prompt --rows 100 --out benchmarks/results/real_model/prompt.json
    # two jobs/eval.py runs on the same posts side by side (e.g. SFT against RL): length ratio,
    # reward, ROUGE, and the first --show posts as a Markdown table
    python benchmarks/real_model.py side-by-side runs/eval_sft runs/eval_grpo --show 10 \\
        --out benchmarks/results/real_model/grpo_vs_sft.md

The eval posts are the held-out part of ../shared/data/tldr_sft.jsonl under the chain's document
split (``holdout_share: 0.1``), never trained on by SFT or RL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ENV_DEFAULTS = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EVAL_POSTS = "../shared/data/tldr_sft.jsonl"
CHAT_REQUEST = "Summarize this Reddit post in one sentence (a TL;DR):\n\n{post}"


def eval_pairs(path: str, rows: int) -> tuple[list[str], list[str]]:
    """(posts, reference TL;DRs) of the held-out part of ``path``, the chain's eval posts."""
    from rlhf.config.sections import DataSourceConfig
    from rlhf.data.schemas import Schema
    from rlhf.data.sources import load_source

    source = DataSourceConfig(path=path, holdout_share=0.1, part="holdout", limit=rows)
    table = load_source(source, Schema.SFT).table
    return table.column("original_text").to_pylist(), table.column("summary").to_pylist()


def chat_summaries(policy, posts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy summaries when each post is a user turn of the model's chat template."""
    import torch

    tokenizer = policy.tokenizer
    out = []
    for start in range(0, len(posts), batch_size):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": CHAT_REQUEST.format(post=p)}],
                                               tokenize=False, add_generation_prompt=True)
                 for p in posts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False)
        with torch.no_grad():
            ids = policy.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                        pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def summary_stats(summaries: list[str], references: list[str]) -> dict:
    from rlhf.eval.rouge import rouge

    return {**rouge(summaries, references),
            "summary_words_mean": statistics.mean(len(s.split()) for s in summaries),
            "reference_words_mean": statistics.mean(len(r.split()) for r in references)}


def prompt_formats(args: argparse.Namespace) -> dict:
    """Zero-shot ROUGE and length of the base model with each prompt format."""
    import torch

    from rlhf.config.sections import ModelConfig
    from rlhf.models import load_policy

    torch.set_num_threads(args.threads)
    posts, references = eval_pairs(args.data, args.rows)
    policy = load_policy(ModelConfig(name_or_path=args.model, max_source_length=args.max_source_length,
                                     max_target_length=args.max_new_tokens))
    results = {}
    for name, summarize in {
        "tldr": lambda batch: policy.generate(batch, do_sample=False),
        "chat": lambda batch: chat_summaries(policy, batch, len(batch), args.max_new_tokens),
    }.items():
        start, summaries = time.time(), []
        for i in range(0, len(posts), args.batch_size):
            batch = [_cut(policy, p, args.max_source_length) for p in posts[i:i + args.batch_size]]
            summaries += summarize(batch)
        results[name] = {**summary_stats(summaries, references), "seconds": time.time() - start,
                         "samples": summaries[:3]}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "samples"}), flush=True)
    return {"model": args.model, "rows": len(posts), "max_new_tokens": args.max_new_tokens, **results}


def _cut(policy, post: str, tokens: int) -> str:
    """The post cut to ``tokens`` tokens, so both formats read the same text."""
    ids = policy.tokenizer(post, add_special_tokens=False).input_ids[:tokens - 8]
    return policy.tokenizer.decode(ids)


def side_by_side(args: argparse.Namespace) -> dict:
    """Two eval runs' summaries of the same posts: how B differs from A, and a table of examples."""
    a, b = (_read_rows(Path(run) / "summaries.jsonl") for run in (args.a, args.b))
    if [r["document"] for r in a] != [r["document"] for r in b]:
        raise SystemExit("side-by-side: the two runs summarised different posts")
    words_a = [len(r["summary"].split()) for r in a]
    words_b = [len(r["summary"].split()) for r in b]
    report = {"rows": len(a), "run_a": args.a, "run_b": args.b,
              "length_ratio": statistics.mean(words_b) / statistics.mean(words_a),
              "a": summary_stats([r["summary"] for r in a], [r["reference"] for r in a]),
              "b": summary_stats([r["summary"] for r in b], [r["reference"] for r in b])}
    if "reward" in a[0] and "reward" in b[0]:
        report["reward_mean_a"] = statistics.mean(r["reward"] for r in a)
        report["reward_mean_b"] = statistics.mean(r["reward"] for r in b)
        gains = [rb["reward"] - ra["reward"] for ra, rb in zip(a, b)]
        report["reward_gain"] = statistics.mean(gains)
        report["reward_gain_standard_error"] = statistics.stdev(gains) / len(gains) ** 0.5  # paired, per post
        report["b_scores_higher"] = statistics.mean(g > 0 for g in gains)
    lines = [f"| post | {Path(args.a).name} | {Path(args.b).name} |", "|---|---|---|"]
    for ra, rb in list(zip(a, b))[: args.show]:
        post = " ".join(ra["document"].split())
        lines.append(f"| {_cell(post[:220] + ('...' if len(post) > 220 else ''))} | {_cell(ra['summary'])} "
                     f"| {_cell(rb['summary'])} |")
    report["table"] = "\n".join(lines)
    return report


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prompt = commands.add_parser("prompt", help="zero-shot prompt formats")
    prompt.add_argument("--model", default=MODEL)
    prompt.add_argument("--data", default=EVAL_POSTS)
    prompt.add_argument("--rows", type=int, default=100)
    prompt.add_argument("--batch-size", type=int, default=20)
    prompt.add_argument("--max-source-length", type=int, default=256)
    prompt.add_argument("--max-new-tokens", type=int, default=48)
    prompt.add_argument("--threads", type=int, default=2)
    pair = commands.add_parser("side-by-side", help="two eval runs on the same posts")
    pair.add_argument("a")
    pair.add_argument("b")
    pair.add_argument("--show", type=int, default=10)
    for sub in (prompt, pair):
        sub.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = prompt_formats(args) if args.command == "prompt" else side_by_side(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".md":
        args.out.write_text(report.pop("table") + "\n\n```json\n" + json.dumps(report, indent=2) + "\n```\n")
    else:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

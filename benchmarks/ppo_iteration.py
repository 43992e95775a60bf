"""Wall time of one PPO iteration: our trainer without Ray, on Ray actors, and TRL's PPOTrainer.

Every configuration runs the fixed tiny setup of the TRL anchor (../shared/bench/README.md):
random-init GPT-2 (vocab 384, 512 positions, n_embd 128, 2 layers, 4 heads, seed 42) with the
ByT5 tokenizer; value and reward models are GPT-2 backbones with a scalar head; 256 prompts of
exactly 64 tokens; rollout batch 16; exactly 32 sampled tokens (no EOS stop, T=1, top_k=0);
4 PPO epochs x 2 minibatches of 8; fp32; kl_coef 0.05 (k1), clip 0.2, value clip 0.2,
vf_coef 0.1, gamma 1, lambda 0.95, AdamW lr 5e-5.

Configurations, each in its own process (``--config all`` runs them back to back):

* ``single``    -- LocalRoles + PPOTrainer in one process, no Ray, 2 torch threads.
* ``single_1t`` -- the same with 1 thread: what each Ray actor gets (see ``ray``).
* ``ray``       -- RayRoles + PPOTrainer: 4 actors (generator, reward, reference, learner) at
  roles.cpus_per_actor=0.5 on a private ``ray.init(num_cpus=2)``; each actor runs 1 torch thread
  (int(0.5) -> 1). Peak RSS is the driver's only; actor RSS at the end is reported apart.
* ``trl``       -- the anchor script itself in its own venv (see ``TRL_INSTALL``).

Differences from TRL that are ours by design, not benchmark artefacts: the reward model scores
the decoded text (document + "\\nTL;DR:" + summary + EOS, re-tokenised, summary cut to 32 tokens),
not TRL's token ids; the value model starts from the policy backbone; a weight sync to the
generator follows each iteration. Dropout is 0 in the saved GPT-2 config, as TRL's
``disable_dropout_in_model`` does to all its models (same architecture and parameter count).

    python benchmarks/ppo_iteration.py --config all --warmup 2 --iters 14 --out-dir benchmarks/results
    python benchmarks/ppo_iteration.py --config summary   # the table again from the JSON files
    python benchmarks/ppo_iteration.py --config estimators --warmup 2 --iters 14 --out-dir benchmarks/results

``--config estimators`` runs ``single`` and ``ray_2t`` with each advantage estimator back to back
(JSON in ``OUT_DIR/estimators/``, apart from the anchor comparison's files):
``gae`` (PPO with a value model, 16 documents) and the critic-free ``grpo`` and ``rloo`` (4 documents
x ``ppo.samples_per_document=4``: the same 16 summaries per iteration, no value model). The KL
penalty stays in the reward (k1) for all three, so only the estimator and the critic differ.

``--config lora`` runs ``single`` and ``ray_2t`` (PPO, gae) in full fine-tuning and with LoRA r=8
(PEFT's GPT-2 default, ``c_attn``) back to back (JSON in ``OUT_DIR/lora/``): with adapters no
reference actor starts (the learner's base with the adapter off is the reference) and a weight sync
moves the adapters alone.

Run it on an idle machine: each JSON records the load average before and after its run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT.parent / "shared" / "bench" / "trl_ppo_anchor.py"  # ../shared/bench/, beside the repository
TRL_PYTHON = Path("/tmp/trl/bin/python")
TRL_INSTALL = "python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl==0.28.0"

N_PROMPTS = 256
PROMPT_TOKENS = 64
SEPARATOR_BYTES = len(b"\nTL;DR:")  # rlhf.models.CAUSAL_SEPARATOR in ByT5 = 7 tokens
DOCUMENT_BYTES = PROMPT_TOKENS - SEPARATOR_BYTES  # 57
RESPONSE_TOKENS = 32
SEED = 42
CONFIGS = ("single", "single_1t", "ray", "ray_2t", "trl")
ESTIMATOR_CONFIGS = ("single", "ray_2t")
ADVANTAGES = ("gae", "grpo", "rloo")
GROUP_SIZE = 4  # summaries per document for the critic-free estimators
THREADS = {"single": 2, "single_1t": 1}
WHAT = {
    "single": "LocalRoles + PPOTrainer, no Ray, 2 threads",
    "single_1t": "LocalRoles + PPOTrainer, no Ray, 1 thread",
    "ray": "RayRoles (4 actors x 0.5 CPU, 1 thread each) + PPOTrainer, ray.init(num_cpus=2)",
    "ray_2t": "RayRoles (4 actors x 0.5 CPU, 2 threads each: roles.threads_per_actor=2) + PPOTrainer",
}
# IterationMetrics fields, read with getattr: a renamed field is an AttributeError
ROLE_KEYS = ("time_generate_s", "time_score_s", "time_reference_s", "time_learn_s", "time_sync_s", "time_s")

ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
}


# ------------------------------------------------------------------------------ helpers


def summarize(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "mean": statistics.fmean(xs), "median": statistics.median(xs), "min": min(xs),
            "max": max(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def anchor_sentences(anchor: Path) -> list[str]:
    """The anchor's SENTENCES list, read from its source so both sides use the same text."""
    tree = ast.parse(anchor.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SENTENCES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{anchor}: no SENTENCES list")


def build_documents(sentences: list[str]) -> list[str]:
    """256 documents of exactly 57 ASCII bytes, cut from the anchor's prompt texts (same recipe),
    so that document + "\\nTL;DR:" is exactly 64 ByT5 tokens."""
    n, documents = len(sentences), []
    for i in range(N_PROMPTS):
        parts, j, text = [], 0, ""
        while len(text.encode()) < PROMPT_TOKENS + 8:
            parts.append(sentences[(i * 7 + j * 3) % n])
            text = " ".join(parts)
            j += 1
        document = text[(i * 5) % 20:][:DOCUMENT_BYTES]
        assert document.isascii() and len(document.encode()) == DOCUMENT_BYTES, (i, document)
        documents.append(document)
    return documents


def build_models(folder: Path) -> tuple[Path, Path]:
    """The anchor's GPT-2 (seed 42) + ByT5 tokenizer as an HF folder, and a reward model folder
    (GPT-2 backbone of that policy + a scalar head) saved by RewardModel.save."""
    import torch
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf.config.sections import ModelConfig
    from rlhf.models import load_reward_model

    tokenizer = ByT5Tokenizer()
    assert len(tokenizer) == 384 and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    config = GPT2Config(
        vocab_size=384, n_positions=512, n_embd=128, n_layer=2, n_head=4,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # TRL's PPOTrainer sets every dropout p to 0 (disable_dropout_in_model); our trainer does
        # not touch dropout, so the saved config carries p=0 instead. Architecture unchanged.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    policy_dir, reward_dir = folder / "policy", folder / "reward"
    model.save_pretrained(str(policy_dir))
    tokenizer.save_pretrained(str(policy_dir))
    load_reward_model(ModelConfig(name_or_path=str(policy_dir))).save(reward_dir)
    return policy_dir, reward_dir


def ppo_config(workdir: Path, policy_dir: Path, reward_dir: Path, iterations: int, extra: list[str]):
    from rlhf.config.core import load_config
    from rlhf.ppo.config import PPOConfig

    never = iterations + 1000  # no checkpoint/publish I/O (the script also never calls them)
    return load_config(PPOConfig, None, [
        f"output_dir={workdir / 'run'}", f"seed={SEED}",
        f"policy.name_or_path={policy_dir}", f"policy.max_source_length={PROMPT_TOKENS}",
        f"policy.max_target_length={RESPONSE_TOKENS}",
        "reward.fn=", f"reward.model.name_or_path={reward_dir}",
        f"reward.model.max_source_length={PROMPT_TOKENS}",
        # summary cut to 32 tokens + EOS: the reward reads <= 97 tokens, like TRL's 96
        f"reward.model.max_target_length={RESPONSE_TOKENS + 1}",
        "reward.normalize=false",
        f"ppo.iterations={iterations}", "ppo.rollout_batch_size=16", "ppo.minibatch_size=8",
        "ppo.epochs=4", "ppo.lr=5e-5", "ppo.max_grad_norm=1.0", "ppo.clip_eps=0.2",
        "ppo.value_clip_eps=0.2", "ppo.vf_coef=0.1", "ppo.entropy_coef=0.0", "ppo.gamma=1.0",
        "ppo.lam=0.95", "ppo.kl_coef=0.05", "ppo.kl_kind=k1", "ppo.whiten_advantages=true",
        "ppo.temperature=1.0", "ppo.top_p=1.0", f"ppo.max_new_tokens={RESPONSE_TOKENS}",
        "ppo.stop_at_eos=false", f"ppo.checkpoint_every={never}", f"ppo.publish_every={never}",
        *extra,
    ])


def check_prompts(cfg, documents: list[str]) -> list[int]:
    """Every prompt is exactly 64 tokens, unpadded, as the policy's generator encodes it."""
    from rlhf.models import load_policy

    batch = load_policy(cfg.policy).encode_documents(documents)
    shape = list(batch["input_ids"].shape)
    assert shape == [N_PROMPTS, PROMPT_TOKENS], shape
    assert bool(batch["attention_mask"].all()), "a prompt is padded"
    return shape


def versions() -> dict:
    """Package versions from metadata: importing ray into the no-Ray process would add to its RSS."""
    import torch

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            **{name: metadata.version(name) for name in ("torch", "transformers", "deepspeed", "ray")},
            "cpu_count": os.cpu_count(), "torch_num_threads_driver": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def descendants_rss_mb() -> dict[str, float]:
    """Current RSS of this process's descendants (raylet, GCS, actor workers), by process name."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            name, rss = proc.name(), proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
        out[name] = out.get(name, 0.0) + rss
    return out


# ------------------------------------------------------------------------------ our trainer


def run_ours(name: str, args: argparse.Namespace) -> dict:
    import torch

    from rlhf.ppo.trainer import PPOTrainer, PromptStream

    load_before = loadavg()
    workdir = Path(tempfile.mkdtemp(prefix=f"ppo-bench-{name}-"))
    documents = build_documents(anchor_sentences(args.anchor))
    policy_dir, reward_dir = build_models(workdir)
    n_iters = args.warmup + args.iters
    extra = {"ray": ["roles.cpus_per_actor=0.5"],
             "ray_2t": ["roles.cpus_per_actor=0.5", "roles.threads_per_actor=2"]}.get(name, [])
    if args.lora:
        extra.append(f"lora.r={args.lora}")
    if args.advantage != "gae":  # the same 16 summaries: 4 documents x 4 samples, no value model
        extra += [f"ppo.advantage={args.advantage}", f"ppo.samples_per_document={GROUP_SIZE}",
                  f"ppo.rollout_batch_size={16 // GROUP_SIZE}", "ppo.kl_in=reward"]
    cfg = ppo_config(workdir, policy_dir, reward_dir, n_iters, extra)
    prompt_shape = check_prompts(cfg, documents)

    order = torch.randperm(N_PROMPTS, generator=torch.Generator().manual_seed(SEED)).tolist()
    stream = PromptStream(lambda epoch: iter([documents[i] for i in order]))

    t_setup = time.perf_counter()
    ray_mod = None
    if name.startswith("ray"):
        import ray as ray_mod

        from rlhf.ppo.actors import RayRoles, _threads

        ray_mod.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
        roles = RayRoles(cfg)
        threads = {"per_actor": _threads(cfg), "actors": cfg.actors,
                   "cpus_per_actor": cfg.roles.cpus_per_actor}
    else:
        from rlhf.ppo.roles import LocalRoles

        roles = LocalRoles(cfg, threads=THREADS[name])
        threads = {"process": THREADS[name], "torch_get_num_threads": torch.get_num_threads()}
    setup_s = time.perf_counter() - t_setup

    trainer = PPOTrainer(cfg, roles, stream, log=lambda record: None)
    records = []
    try:
        for _ in range(n_iters):
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = trainer.step()  # no checkpoint/publish: run() would add them
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            assert metrics.response_length_mean == RESPONSE_TOKENS, metrics.response_length_mean
            record = {"wall_s": wall, "process_cpu_s": cpu, **{k: getattr(metrics, k) for k in ROLE_KEYS},
                      "sync_transfer_s": metrics.sync_transfer_s, "sync_bytes": metrics.sync_bytes,
                      "reward_mean": metrics.reward_mean,
                      "kl_mean": metrics.kl_mean, "eos_fraction": metrics.eos_fraction,
                      "peak_rss_mb": peak_rss_mb()}
            records.append(record)
            print(f"[{name}] iter {metrics.iteration}: {wall:.3f} s (cpu {cpu:.3f} s) "
                  + " ".join(f"{k[5:-2]}={getattr(metrics, k):.3f}" for k in ROLE_KEYS[:-1]), flush=True)
        actors_rss = descendants_rss_mb() if name.startswith("ray") else None
    finally:
        if ray_mod is not None:
            roles.shutdown()
            ray_mod.shutdown()

    measured = records[args.warmup:]
    peak = peak_rss_mb()
    return {
        "config": name,
        "advantage": args.advantage,
        "lora_r": args.lora,
        "what": WHAT[name],
        "threads": threads,
        "versions": versions(),
        "setup": {"prompt_shape": prompt_shape, "response_tokens": RESPONSE_TOKENS,
                  "rollout_batch_size": cfg.ppo.rollout_batch_size, "minibatch_size": cfg.ppo.minibatch_size,
                  "samples_per_document": cfg.ppo.samples_per_document,
                  "epochs": cfg.ppo.epochs, "lr": cfg.ppo.lr, "kl_coef": cfg.ppo.kl_coef, "seed": SEED,
                  "roles_setup_s": setup_s},
        "warmup_iters": args.warmup,
        "measured_iters": len(measured),
        "iteration_s": summarize([r["wall_s"] for r in measured]),
        # CPU seconds of this process (all its threads) per iteration; for ray: the driver's only
        "process_cpu_s": summarize([r["process_cpu_s"] for r in measured]),
        **{k: summarize([r[k] for r in measured]) for k in ROLE_KEYS},
        "warmup_iteration_s": [r["wall_s"] for r in records[: args.warmup]],
        "peak_rss_mb": peak,
        "peak_rss_scope": "driver only; actors are other processes" if name.startswith("ray") else "process",
        "ray_descendants_rss_mb_at_end": actors_rss,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "records": records,
    }


# ------------------------------------------------------------------------------ TRL anchor


def run_trl(args: argparse.Namespace, out: Path) -> dict | None:
    if not TRL_PYTHON.exists():
        print(f"[trl] skipped: {TRL_PYTHON} not found; install it with:\n  {TRL_INSTALL}", flush=True)
        return None
    load_before = loadavg()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(TRL_PYTHON), str(args.anchor), "--mode", "ppo", "--warmup", str(args.warmup),
           "--iters", str(args.iters), "--workdir", tempfile.mkdtemp(prefix="ppo-bench-trl-"),
           "--out", str(out)]
    print("[trl] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(out.read_text())
    result["loadavg_before"], result["loadavg_after"] = load_before, loadavg()
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------ summary


def summary_table(out_dir: Path) -> str:
    results = {}
    for name in CONFIGS:
        path = out_dir / f"ppo_{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())

    def total(res: dict) -> dict:
        return res["total_s"] if "total_s" in res else res["iteration_s"]  # anchor vs ours

    def role(res: dict, key: str) -> str:
        return f"{res[key]['mean']:.3f}" if key in res else "-"

    rows = ["| config | iters | mean s/iter | min | max | generate | score | reference | learn | sync "
            "| peak RSS MB | RSS all processes MB | loadavg before |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        t = total(res)
        if name == "trl":
            split = [f"{res['generate_s']['mean']:.3f}", f"{res['value_reward_fwd_s']['mean']:.3f} (val+rew)",
                     f"{res['ref_fwd_s']['mean']:.3f}", f"{res['train_s']['mean']:.3f} (8 updates)", "-"]
        else:
            split = [role(res, f"time_{k}_s") for k in ("generate", "score", "reference", "learn", "sync")]
        others = res.get("ray_descendants_rss_mb_at_end")
        everything = f"{res['peak_rss_mb'] + sum(others.values()):.0f}" if others else "-"
        load = res.get("loadavg_before")
        rows.append(f"| {name} | {t['n']} | {t['mean']:.3f} | {t['min']:.3f} | {t['max']:.3f} | "
                    + " | ".join(split)
                    + f" | {res['peak_rss_mb']:.0f}{' (driver)' if name == 'ray' else ''} | {everything} | "
                    + (f"{load[0]:.2f}" if load else "-") + " |")
    rows.append("")
    rows.append("Role columns are means in s. Ours: learn = old log-probs/values forward + GAE + 8 minibatch "
                "updates; score = reward model; reference = reference log-probs. TRL: score = value + reward "
                "forwards, reference = reference forward, learn = the 8 updates; TRL's per-iteration "
                "gc.collect() is only in the total. RSS all processes (ray) = driver peak + Ray processes "
                "(raylet, GCS, agents, 4 actors) at the end.")
    ratios = []
    for a, b in (("ray", "single"), ("ray", "single_1t"), ("ray_2t", "single"), ("ray", "trl"),
                 ("single", "trl"),
                 ("single_1t", "trl")):
        if a in results and b in results:
            ratios.append(f"| {a} / {b} | {total(results[a])['mean'] / total(results[b])['mean']:.2f} |")
    text = "\n".join(rows)
    if ratios:
        text += "\n\n| ratio (mean s/iter) | value |\n|---|---|\n" + "\n".join(ratios)
    return text


def estimators_table(out_dir: Path) -> str:
    """PPO (gae) vs GRPO vs RLOO per configuration: s/iter, learn s, peak memory, ratios to gae."""
    rows = ["| config | estimator | s/iter (mean) | learn s | peak RSS MB | RSS all processes MB | "
            "s/iter vs gae | memory vs gae |", "|---|---|---|---|---|---|---|---|"]
    for name in ESTIMATOR_CONFIGS:
        results = {a: json.loads(path.read_text()) for a in ADVANTAGES
                   if (path := out_dir / result_name(name, a)).exists()}

        def memory(res: dict) -> float:
            others = res.get("ray_descendants_rss_mb_at_end") or {}
            return res["peak_rss_mb"] + sum(others.values())

        for advantage, res in results.items():
            base = results.get("gae")
            vs = (f"{res['iteration_s']['mean'] / base['iteration_s']['mean']:.2f} | "
                  f"{memory(res) / memory(base):.2f}") if base else "- | -"
            everything = f"{memory(res):.0f}" if res.get("ray_descendants_rss_mb_at_end") else "-"
            rows.append(f"| {name} | {advantage} | {res['iteration_s']['mean']:.3f} | "
                        f"{res['time_learn_s']['mean']:.3f} | {res['peak_rss_mb']:.0f} | {everything} "
                        f"| {vs} |")
    return "\n".join(rows)


def lora_table(out_dir: Path) -> str:
    """Full fine-tuning vs LoRA per configuration: s/iter, bytes per sync, memory of every process."""
    rows = ["| config | lora.r | s/iter (mean) | sync bytes | sync s | peak RSS MB | RSS all processes MB | "
            "processes |", "|---|---|---|---|---|---|---|---|"]
    for name in ESTIMATOR_CONFIGS:
        for path in [out_dir / f"ppo_{name}.json", *sorted(out_dir.glob(f"ppo_{name}_lora*.json"))]:
            res = json.loads(path.read_text())
            others = res.get("ray_descendants_rss_mb_at_end") or {}
            actors = ", ".join(f"{k} {v:.0f}" for k, v in sorted(others.items()) if k.startswith("ray::"))
            measured = res["records"][res["warmup_iters"]:]
            rows.append(f"| {name} | {res['lora_r']} | {res['iteration_s']['mean']:.3f} | "
                        f"{statistics.median(r['sync_bytes'] for r in measured):,.0f} | "
                        f"{res['time_sync_s']['mean']:.3f} | {res['peak_rss_mb']:.0f} | "
                        f"{res['peak_rss_mb'] + sum(others.values()):.0f} | {actors or '-'} |")
    return "\n".join(rows)


def result_name(config: str, advantage: str, lora: int = 0) -> str:
    if lora:
        return f"ppo_{config}_lora{lora}.json"
    return f"ppo_{config}.json" if advantage == "gae" else f"ppo_{config}_{advantage}.json"


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=(*CONFIGS, "all", "summary", "estimators", "lora"), default="all",
                        help="all = single, single_1t, ray, ray_2t, trl, each in its own process, back to "
                        "back; estimators = single and ray_2t with each --advantage")
    parser.add_argument("--advantage", choices=ADVANTAGES, default="gae",
                        help="ppo.advantage of our configs (grpo/rloo: 4 documents x 4 samples)")
    parser.add_argument("--lora", type=int, default=0, help="lora.r of our configs (0 = full fine-tuning)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=14)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--anchor", type=Path, default=ANCHOR, help="the TRL anchor script")
    args = parser.parse_args()
    if args.config != "summary" and not args.anchor.is_file():
        parser.error(f"--anchor: TRL anchor script not found at {args.anchor}; it lives in ../shared/bench/ "
                     "beside the repository root: check out the shared folder there or pass --anchor PATH")
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.config != "summary" and loadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {loadavg()} on {os.cpu_count()} CPUs: timings will be contaminated "
              "(2-thread OpenMP configs slow down by 10-100x when the cores are shared)", flush=True)

    if args.config in ("all", "estimators", "lora"):
        runs = {"all": [(name, "gae", 0) for name in CONFIGS],
                "estimators": [(name, a, 0) for name in ESTIMATOR_CONFIGS for a in ADVANTAGES],
                "lora": [(name, "gae", r) for name in ESTIMATOR_CONFIGS for r in (0, 8)]}[args.config]
        out_dir = args.out_dir / args.config if args.config != "all" else args.out_dir
        for name, advantage, lora in runs:
            cmd = [sys.executable, __file__, "--config", name, "--advantage", advantage, "--warmup",
                   str(args.warmup), "--iters", str(args.iters), "--out-dir", str(out_dir),
                   "--anchor", str(args.anchor), "--lora", str(lora)]
            print(f"=== {name} ({advantage}): {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
    elif args.config == "trl":
        run_trl(args, args.out_dir / "ppo_trl.json")
    elif args.config != "summary":
        if args.config in THREADS:  # before torch starts its thread pool
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS[args.config])
        result = run_ours(args.config, args)
        result["argv"] = sys.argv
        out = args.out_dir / result_name(args.config, args.advantage, args.lora)
        out.write_text(json.dumps(result, indent=2) + "\n")
        it = result["iteration_s"]
        print(f"[{args.config}] {it['mean']:.3f} s/iter (min {it['min']:.3f}, max {it['max']:.3f}) over "
              f"{it['n']} iterations; peak RSS {result['peak_rss_mb']:.0f} MB -> {out}", flush=True)
    if args.config in ("all", "summary"):
        print(summary_table(args.out_dir))
    if args.config == "estimators":
        print(estimators_table(args.out_dir / "estimators"))
    if args.config == "lora":
        print(lora_table(args.out_dir / "lora"))


if __name__ == "__main__":
    main()

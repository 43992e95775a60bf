"""Seconds per GRPO (or PPO) step on a real SmolLM2-135M-Instruct, ours beside TRL's trainer, CPU.

Mirrors ``../shared/bench/trl_grpo_anchor.py`` (its README section has the setup): the same fp32
model folder (the anchor converts the GGUF once into ``--model-cache``), the same 8 TL;DR posts per
step in file order, each cut to exactly 192 tokens + "\\nTL;DR:" (197 prompt tokens, no padding;
checked), 4 summaries per post, exactly 48 new tokens (``ppo.stop_at_eos=false``), T=1, top_p=1,
reward ``-|words - 20|`` (``reward_words`` below, as ``reward.fn``), one AdamW step (lr 1e-6,
clip 1.0) per 32 summaries (``ppo.minibatch_size=32``, ``ppo.epochs=1``), KL to the initial
policy in the loss with beta 0.04 (k3, GRPO's default placement and kind), fp32, 2 threads. With
``--lora``: r=16, alpha 32, dropout 0 on q/k/v/o_proj, the base with the adapter off as reference.

Configurations, each in its own process (``--config all`` runs them back to back):

* ``single`` -- LocalRoles + PPOTrainer in one process, no Ray, 2 torch threads.
* ``ray``    -- RayRoles + PPOTrainer on ``ray.init(num_cpus=2)``: generator, reward, learner (and
  reference, full fine-tuning only) actors at 0.5 CPU with 2 threads each; they run one after another.
* ``ray_colocated`` -- ``roles.colocate=true`` on the same Ray: every role in one actor (2 CPUs,
  2 threads), the weight sync an in-process copy.
* ``trl``    -- the anchor itself, in its own venv (``--trl-python``; install line in its README).
* ``single_plain`` -- ``single`` with every prompt read once per row and the old-log-prob pass run
  (the two changes of issue 30 switched off in this process): what they save.

``--algo ppo``: PPO with a critic beside TRL 0.28's PPOTrainer (``trl_ppo_real_anchor.py`` here, in
its own venv ``/tmp/trl``): 32 posts per step cut as above, one summary each, exactly 48 new tokens,
reward and value models the SmolLM2 backbone under a 1-output head (ours: ``reward.model`` and
``value`` on the same folder), GAE (gamma 1, lam 0.95), KL k1 0.05 in the reward, vf_coef 0.1,
one AdamW step per rollout; ``--forward-batch-size 8`` matches TRL's micro-batches of 8 (its
generation is one call over the 32 rows: ``--generate-batch-size 32``).

Step time = one ``PPOTrainer.step`` (generate, score, reference, learn, sync), after ``--warmup``.

    python benchmarks/grpo_real.py --config all --warmup 1 --iters 3  # JSON: benchmarks/results/grpo_real
    python benchmarks/grpo_real.py --config all --lora --warmup 1 --iters 3
    python benchmarks/grpo_real.py --config summary
    python benchmarks/grpo_real.py --config scaling --warmup 1 --iters 1  # 8/16/32 x 32/64/128 tokens
    python benchmarks/grpo_real.py --algo ppo --config all --forward-batch-size 8 --warmup 1 --iters 2
    python benchmarks/grpo_real.py --algo ppo --config single --forward-batch-size 8 \
        --generate-batch-size 32 --tag _gen32 --warmup 1 --iters 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when reward.fn loads this file in an actor
from ppo_iteration import ENV_DEFAULTS, descendants_rss_mb, loadavg, peak_rss_mb, summarize, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = {"grpo": ROOT.parent / "shared" / "bench" / "trl_grpo_anchor.py",
           "ppo": ROOT / "benchmarks" / "trl_ppo_real_anchor.py"}
DATA = ROOT.parent / "shared" / "data" / "tldr_sft.jsonl"
TRL_PYTHONS = {"grpo": Path("/tmp/trl-grpo/bin/python"), "ppo": Path("/tmp/trl/bin/python")}  # 1.16, 0.28
MODEL_CACHE = Path("/tmp/smollm2-135m-hf")
CONFIGS = ("single", "ray", "trl", "single_plain", "ray_colocated")
RAY_CONFIGS = {"ray": ["roles.cpus_per_actor=0.5"],
               "ray_colocated": ["roles.colocate=true", "roles.cpus_per_actor=2"]}
# The scaling grid (``--config scaling``): summaries per step (posts x GROUP) x tokens per summary.
SCALING_PROMPTS, SCALING_TOKENS = (2, 4, 8), (32, 64, 128)
PROMPTS_PER_STEP, GROUP, PROMPT_TOKENS, NEW_TOKENS = 8, 4, 192, 48
PPO_PROMPTS_PER_STEP, PPO_KL = 32, 0.05  # PPO: one summary per post, 32 per step as GRPO's 8 x 4
TARGET_WORDS, SEED, THREADS = 20, 42, 2
ROLE_KEYS = ("time_generate_s", "time_score_s", "time_reference_s", "time_learn_s", "time_sync_s", "time_s")


def reward_words(documents: list[str], summaries: list[str]) -> list[float]:
    """The anchor's reward: prefer ~20-word summaries (``reward.fn=benchmarks/grpo_real.py:reward_words``)."""
    return [-abs(len(summary.split()) - TARGET_WORDS) for summary in summaries]


def build_documents(tokenizer, n: int) -> list[str]:
    """The anchor's prompts without their "\\nTL;DR:" (our causal encoding appends it): the first ``n``
    posts of at least 192 tokens, cut to exactly 192, whose prompt re-tokenizes to 197 tokens."""
    from rlhf.models.encoding import CAUSAL_SEPARATOR

    want = PROMPT_TOKENS + len(tokenizer(CAUSAL_SEPARATOR)["input_ids"])
    documents = []
    with DATA.open() as lines:
        for line in lines:
            ids = tokenizer(json.loads(line)["post"])["input_ids"]
            text = tokenizer.decode(ids[:PROMPT_TOKENS])
            if len(ids) >= PROMPT_TOKENS and len(tokenizer(text + CAUSAL_SEPARATOR)["input_ids"]) == want:
                documents.append(text)
            if len(documents) == n:
                return documents
    raise SystemExit(f"only {len(documents)} usable posts in {DATA}, need {n}")


def algo_keys(algo: str, prompts: int) -> list[str]:
    """What differs between the two mirrors: GRPO's groups and rule reward, PPO's models and GAE."""
    if algo == "grpo":
        return [f"reward.fn={Path(__file__).resolve()}:reward_words", "ppo.advantage=grpo",
                f"ppo.samples_per_document={GROUP}", f"ppo.rollout_batch_size={prompts}",
                f"ppo.minibatch_size={prompts * GROUP}", "ppo.kl_coef=0.04", "ppo.max_grad_norm=1.0"]
    return [f"reward.model.name_or_path={MODEL_CACHE}", "reward.model.max_source_length=256",
            "reward.normalize=false", f"value.name_or_path={MODEL_CACHE}", "value.max_source_length=256",
            "ppo.advantage=gae", "ppo.samples_per_document=1", f"ppo.rollout_batch_size={prompts}",
            f"ppo.minibatch_size={prompts}", f"ppo.kl_coef={PPO_KL}", "ppo.kl_in=reward", "ppo.kl_kind=k1",
            "ppo.gamma=1.0", "ppo.lam=0.95", "ppo.vf_coef=0.1", "ppo.value_clip_eps=0.2",
            "ppo.max_grad_norm=1e9"]  # TRL's PPO loop steps AdamW without clipping


def grpo_config(workdir: Path, iterations: int, lora: bool, extra: list[str], seed: int = SEED,
                prompts: int = PROMPTS_PER_STEP, new_tokens: int = NEW_TOKENS, algo: str = "grpo"):
    from rlhf.config.core import load_config
    from rlhf.ppo.config import PPOConfig

    never = iterations + 1000  # no checkpoint or publish inside the timed steps
    lora_keys = ["lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
                 "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"] if lora else []
    return load_config(PPOConfig, None, [
        f"output_dir={workdir / 'run'}", f"seed={seed}",
        f"policy.name_or_path={MODEL_CACHE}", "policy.max_source_length=256",
        f"policy.max_target_length={new_tokens}", *algo_keys(algo, prompts),
        "ppo.epochs=1", "ppo.clip_eps=0.2", "ppo.temperature=1.0", "ppo.top_p=1.0",
        f"ppo.max_new_tokens={new_tokens}", "ppo.stop_at_eos=false", f"ppo.iterations={iterations}",
        f"ppo.checkpoint_every={never}", f"ppo.publish_every={never}", "roles.dtype=fp32",
        *lora_keys, *extra,
    ])


def switch_off_issue_30() -> None:
    """``single_plain``: every row reads its own prompt, and the learner's old-log-prob pass runs."""
    import functools

    from rlhf.models import scoring
    from rlhf.ppo import experience, roles
    from rlhf.ppo.config import PPOAlgoConfig

    experience.generate_rollout = functools.partial(experience.generate_rollout, share_prompts=False)
    every_row = scoring.response_logits
    scoring.response_logits = lambda model, policy, responses, share_prompts=False: every_row(  # type: ignore
        model, policy, responses, False)
    roles.generate_rollout = experience.generate_rollout
    PPOAlgoConfig.single_update = property(lambda self: False)  # type: ignore[assignment]


def run_ours(name: str, args: argparse.Namespace) -> dict:
    import torch

    from rlhf.models import load_policy
    from rlhf.ppo.trainer import PPOTrainer, PromptStream

    load_before = loadavg()
    if name == "single_plain":
        switch_off_issue_30()
    workdir = Path(tempfile.mkdtemp(prefix=f"{args.algo}-real-{name}-"))
    iterations = args.warmup + args.iters
    extra = [*RAY_CONFIGS[name], f"roles.threads_per_actor={args.threads}"] if name in RAY_CONFIGS else []
    extra += [f"roles.forward_batch_size={args.forward_batch_size}",
              f"roles.generate_batch_size={args.generate_batch_size}",
              f"ppo.async_rollout={str(args.async_rollout).lower()}", f"ppo.lr={args.lr}"]
    cfg = grpo_config(workdir, iterations, args.lora, extra, args.seed, *step_shape(args), algo=args.algo)
    policy = load_policy(cfg.policy)
    documents = build_documents(policy.tokenizer, args.prompts_per_step * iterations)
    shape = list(policy.encode_documents(documents)["input_ids"].shape)
    assert shape == [len(documents), PROMPT_TOKENS + 5], shape
    del policy
    stream = PromptStream(lambda epoch: iter(documents))  # file order, as the anchor's shuffle_dataset=False

    start = time.perf_counter()
    ray_mod = None
    if name in RAY_CONFIGS:
        import ray as ray_mod

        from rlhf.ppo.actors import start_roles

        ray_mod.init(address="local", num_cpus=2, include_dashboard=False)
        roles = start_roles(cfg)
    else:
        from rlhf.ppo.roles import LocalRoles

        roles = LocalRoles(cfg, threads=THREADS)
    setup_s = time.perf_counter() - start
    trainer = PPOTrainer(cfg, roles, stream, log=lambda record: None)
    records = []
    try:
        for _ in range(iterations):
            metrics = trainer.step()
            assert metrics.response_length_mean == args.new_tokens, metrics.response_length_mean
            record = {key: getattr(metrics, key) for key in ROLE_KEYS}
            record.update(reward_mean=metrics.reward_mean, kl_mean=metrics.kl_mean, peak_rss_mb=peak_rss_mb(),
                          rollout_lag=metrics.rollout_lag, approx_kl=metrics.approx_kl)
            records.append(record)
            print(f"[{args.algo} {name}{' lora' if args.lora else ''}] step {metrics.iteration}: "
                  + " ".join(f"{key[5:-2]}={record[key]:.1f}" for key in ROLE_KEYS), flush=True)
        actors_rss = descendants_rss_mb() if ray_mod is not None else None
        roles_peak = role_peaks(roles) if ray_mod is not None else None
    finally:
        if ray_mod is not None:
            roles.shutdown()
            ray_mod.shutdown()
    measured = records[args.warmup:]
    return {
        "config": name, "algo": args.algo, "mode": "lora" if args.lora else "full", "versions": versions(),
        "forward_batch_size": args.forward_batch_size, "generate_batch_size": args.generate_batch_size,
        "async_rollout": args.async_rollout,
        "prompts_per_step": args.prompts_per_step, "new_tokens": args.new_tokens,
        "threads_per_actor": args.threads if name in RAY_CONFIGS else THREADS,
        "lr": args.lr, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "prompt_shape": shape, "roles_setup_s": setup_s,
        "single_update": cfg.ppo.single_update if name != "single_plain" else False,
        "warmup_steps": args.warmup, "measured_steps": len(measured),
        **{key: summarize([r[key] for r in measured]) for key in ROLE_KEYS},
        "peak_rss_mb": peak_rss_mb(), "ray_descendants_rss_mb_at_end": actors_rss,
        "role_peak_rss_mb": roles_peak,
        "loadavg_before": load_before, "loadavg_after": loadavg(), "records": records,
    }


def role_peaks(roles) -> dict[str, float]:
    """Each Ray role's own peak RSS in MB (its process's high-water mark)."""
    import ray

    def peak(_actor) -> float:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if not hasattr(roles, "learners"):  # ColocatedRoles: one actor holds them all
        return {"colocated": ray.get(roles.actor.__ray_call__.remote(peak))}
    groups = {"generator": roles.generators, "reward": roles.scorers, "reference": roles.references,
              "learner": roles.learners}
    return {name: max(ray.get([actor.__ray_call__.remote(peak) for actor in actors]))
            for name, actors in groups.items() if actors}


def run_trl(args: argparse.Namespace, out: Path) -> None:
    trl_python = args.trl_python or TRL_PYTHONS[args.algo]
    if not trl_python.exists():
        raise SystemExit(f"{trl_python} not found: set up the anchor's venv as its docstring or README says")
    if args.algo == "ppo" and args.lora:
        raise SystemExit("--lora: the PPO anchor runs full fine-tuning only")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(trl_python), str(ANCHORS[args.algo]), "--warmup", str(args.warmup), "--iters", str(args.iters),
           "--model-cache", str(MODEL_CACHE), "--data", str(DATA), "--out", str(out),
           "--prompts-per-step", str(args.prompts_per_step), "--new-tokens", str(args.new_tokens),
           *(["--lora"] if args.lora else [])]
    print("[trl] " + " ".join(cmd), flush=True)
    load_before = loadavg()
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(out.read_text())
    result.update(loadavg_before=load_before, loadavg_after=loadavg())
    out.write_text(json.dumps(result, indent=2) + "\n")


def step_shape(args: argparse.Namespace) -> tuple[int, int]:
    """(posts per step, tokens per summary) of a run."""
    return args.prompts_per_step, args.new_tokens


def result_path(out_dir: Path, name: str, lora: bool, forward_batch_size: int = 0, tag: str = "",
                shape: tuple[int, int] = (PROMPTS_PER_STEP, NEW_TOKENS), algo: str = "grpo") -> Path:
    """The JSON of one run; a step shape other than the anchor's (prompts, new tokens) is in its name."""
    chunks = f"_fbs{forward_batch_size}" if forward_batch_size else ""
    sized = "" if shape == (default_prompts(algo), NEW_TOKENS) else f"_p{shape[0]}_n{shape[1]}"
    return out_dir / f"{algo}_{name}_{'lora' if lora else 'full'}{chunks}{sized}{tag}.json"


def default_prompts(algo: str) -> int:
    """Posts per step: 8 x 4 summaries for GRPO, 32 x 1 for PPO."""
    return PROMPTS_PER_STEP if algo == "grpo" else PPO_PROMPTS_PER_STEP


def summary_table(out_dir: Path, algo: str = "grpo", forward_batch_size: int = 0) -> str:
    rows = ["| mode | config | steps | s/step (mean) | min | max | generate | score | reference | learn "
            "| sync | peak RSS MB | vs TRL |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lora in (False, True):
        paths = {name: result_path(out_dir, name, lora, 0 if name == "trl" else forward_batch_size,
                                   shape=(default_prompts(algo), NEW_TOKENS), algo=algo) for name in CONFIGS}
        results = {name: json.loads(path.read_text()) for name, path in paths.items() if path.exists()}
        trl = results.get("trl")
        for name, res in results.items():
            step = res["step_s"] if name == "trl" else res["time_s"]
            if name == "trl" and algo == "grpo":  # train_s = 4 micro-batch fwd+bwd + AdamW
                split = [res["generate_s"]["mean"], res["score_other_s"]["mean"], res["ref_logps_s"]["mean"],
                         res["train_s"]["mean"], None]
            elif name == "trl":  # PPO: score = policy, reference, value and reward forwards + GAE
                split = [res["generate_s"]["mean"], res["score_s"]["mean"], None, res["train_s"]["mean"],
                         None]
            else:
                split = [res[f"time_{key}_s"]["mean"]
                         for key in ("generate", "score", "reference", "learn", "sync")]
            others = res.get("ray_descendants_rss_mb_at_end") or {}
            rss = res["peak_rss_mb"] + sum(others.values())
            vs = f"{step['mean'] / (trl['step_s']['mean']):.2f}" if trl else "-"
            rows.append(f"| {'lora' if lora else 'full'} | {name} | {step['n']} | {step['mean']:.1f} | "
                        f"{step['min']:.1f} | {step['max']:.1f} | "
                        + " | ".join("-" if v is None else f"{v:.1f}" for v in split)
                        + f" | {rss:,.0f} | {vs} |")
    return "\n".join(rows)


def scaling_table(out_dir: Path, lora: bool = False) -> str:
    """Seconds per step over the scaling grid: ours (no Ray) / TRL and their ratio, per cell."""
    rows = ["| summaries per step | " + " | ".join(f"{n} tokens: ours / TRL (ratio)" for n in SCALING_TOKENS)
            + " |", "|---|" + "---|" * len(SCALING_TOKENS)]
    for prompts in SCALING_PROMPTS:
        cells = []
        for tokens in SCALING_TOKENS:
            paths = [result_path(out_dir, name, lora, shape=(prompts, tokens)) for name in ("single", "trl")]
            if not all(path.exists() for path in paths):
                cells.append("-")
                continue
            ours, trl = (json.loads(path.read_text()) for path in paths)
            ours_s, trl_s = ours["time_s"]["mean"], trl["step_s"]["mean"]
            cells.append(f"{ours_s:.1f} / {trl_s:.1f} ({ours_s / trl_s:.2f})")
        rows.append(f"| {prompts * GROUP} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def memory_table(out_dir: Path) -> str:
    """Peak RSS of ours per run (single: the one process; ray: the driver's and each role's own),
    full vs LoRA, with and without forward chunks."""
    rows = ["| run (JSON) | threads | async | roles.forward_batch_size | s/step | peak RSS MB (ray: driver) "
            "| peak RSS per Ray role MB |", "|---|---|---|---|---|---|---|"]
    for path in sorted(out_dir.glob("*.json")):
        res = json.loads(path.read_text())
        if res.get("config") not in ("single", *RAY_CONFIGS):
            continue
        peaks = res.get("role_peak_rss_mb") or {}
        actors = ", ".join(f"{name} {mb:,.0f}" for name, mb in peaks.items())
        threads, overlap = res.get("threads_per_actor", THREADS), res.get("async_rollout", False)
        rows.append(f"| {path.stem} | {threads} | {overlap} | {res.get('forward_batch_size', 0)} | "
                    f"{res['time_s']['mean']:.1f} | "
                    f"{res['peak_rss_mb']:,.0f} | {actors or '-'} |")
    return "\n".join(rows)


def child_command(args: argparse.Namespace, name: str, prompts: int, tokens: int) -> list[str]:
    """This script for one configuration and step shape, in its own process (peak RSS is per process)."""
    return [sys.executable, __file__, "--algo", args.algo, "--config", name, "--warmup", str(args.warmup),
            "--iters", str(args.iters), "--out-dir", str(args.out_dir), "--prompts-per-step", str(prompts),
            "--new-tokens", str(tokens), "--forward-batch-size", str(args.forward_batch_size),
            "--generate-batch-size", str(args.generate_batch_size),
            *(["--trl-python", str(args.trl_python)] if args.trl_python else []),
            *(["--lora"] if args.lora else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", choices=("grpo", "ppo"), default="grpo",
                        help="ppo: GAE with a critic and a reward model, beside TRL 0.28's PPOTrainer")
    parser.add_argument("--config", choices=(*CONFIGS, "all", "summary", "scaling"), default="all",
                        help="scaling: ours (single) and TRL over SCALING_PROMPTS x SCALING_TOKENS")
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 on q/k/v/o_proj, not full fine-tuning")
    parser.add_argument("--forward-batch-size", type=int, default=0,
                        help="roles.forward_batch_size of ours (rows per forward and per update chunk)")
    parser.add_argument("--generate-batch-size", type=int, default=0,
                        help="roles.generate_batch_size of ours (0: as --forward-batch-size)")
    parser.add_argument("--async-rollout", action="store_true", help="ppo.async_rollout=true (ours)")
    parser.add_argument("--threads", type=int, default=THREADS, help="roles.threads_per_actor of ray")
    parser.add_argument("--lr", type=float, default=1e-6, help="ppo.lr of ours (the anchors': 1e-6)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of ours (sampling, data order, init)")
    parser.add_argument("--prompts-per-step", type=int, default=None,
                        help=f"posts per step (both systems; default {PROMPTS_PER_STEP} for grpo, {GROUP} "
                             f"summaries each, {PPO_PROMPTS_PER_STEP} for ppo, one each)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                        help="tokens per summary (both systems)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/grpo_real"))
    parser.add_argument("--trl-python", type=Path, default=None,
                        help="the anchor's venv python (default: /tmp/trl-grpo for grpo, /tmp/trl for ppo)")
    args = parser.parse_args()
    args.prompts_per_step = args.prompts_per_step or default_prompts(args.algo)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.config == "scaling":
        for prompts in SCALING_PROMPTS:
            for tokens in SCALING_TOKENS:
                for name in ("trl", "single"):  # the anchor first: it converts the model folder once
                    if result_path(args.out_dir, name, args.lora, shape=(prompts, tokens)).exists():
                        continue  # a grid cut short goes on where it stopped
                    cmd = child_command(args, name, prompts, tokens)
                    print(f"=== {' '.join(cmd)}", flush=True)
                    subprocess.run(cmd, check=True)
        print(scaling_table(args.out_dir, args.lora))
    elif args.config == "all":
        for name in CONFIGS if args.algo == "grpo" else ("trl", "single", "ray"):
            cmd = child_command(args, name, args.prompts_per_step, args.new_tokens)
            print(f"=== {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
    elif args.config == "trl":
        run_trl(args, result_path(args.out_dir, "trl", args.lora, shape=step_shape(args), algo=args.algo))
    elif args.config != "summary":
        if args.config not in RAY_CONFIGS:  # before torch starts its thread pool
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)
        result = run_ours(args.config, args)
        result["argv"] = sys.argv
        out = result_path(args.out_dir, args.config, args.lora, args.forward_batch_size, args.tag,
                          step_shape(args), args.algo)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if args.config in ("all", "summary"):
        print(summary_table(args.out_dir, args.algo, args.forward_batch_size))
        print()
        print(memory_table(args.out_dir))


if __name__ == "__main__":
    main()

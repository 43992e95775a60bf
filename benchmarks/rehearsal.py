"""Every shipped config run on its real architecture on this CPU: rc, step time, peak memory per role.

For each file in ``configs/`` the job runs as configured (ZeRO stage, offload, gradient
checkpointing, sequence lengths, dropout of the checkpoint) with only what this machine forces
changed, each change listed in the results:

- models are the real architectures built from their published ``config.json`` values
  (``benchmarks/model_configs/*.json``, facts copied from the hub) with random weights and the
  byte-level ``ByT5Tokenizer`` (special ids follow the tokenizer; the real vocabulary size stays,
  so vocabulary masking is exercised), saved as local Hugging Face folders; reward and value models
  load the same folder (a fresh head, as from an SFT checkpoint);
- hub datasets become the bundled samples (``rlhf/data/samples``) and the shared ArXiv papers cut
  to those of at least 16,384 bytes, so LED reads 16,384 tokens;
- GPUs become CPUs: ``dtype`` is set to bf16, which ``auto`` resolves to on a GPU, and the
  object-store weight sync that fractional GPUs resolve to is kept;
- every learner runs on 2 data-parallel ranks on gloo; batches, steps and iterations are cut to
  fit 2 cores and 24 GiB (1-2 steps or iterations).

Peak memory is each process's high-water mark (``VmHWM``), grouped by Ray actor class (the
process title Ray sets), sampled every half second. Beside the learner's, the DeepSpeed ZeRO
estimator's model-state figure for the same setup (``benchmarks/zero_memory.py`` uses the same
functions). A config whose estimate cannot fit this machine is not started; its row says why.

    python benchmarks/rehearsal.py [--only ppo_arxiv_led ...] [--out benchmarks/results/rehearsal.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
GIB = 2**30
MACHINE_BUDGET_GIB = 22.0  # of 24 GiB: the OS, page cache and Ray's own processes need the rest
# MALLOC_MMAP_THRESHOLD_: glibc serves tensors of 4 MiB and more by mmap and unmaps them when freed;
# otherwise an idle role keeps the heap of its last 16k-token forward (several GiB) while the
# learner trains, and the machine runs out (on a GPU each role's memory is its device's).
JOB_ENV = {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20), "RLHF_ADMIN_TOKEN": "rehearsal-admin-token-" + "0" * 32}
TLDR_POSTS = "rlhf/data/samples/tldr_comparisons.jsonl"
TLDR_SFT = "rlhf/data/samples/tldr_sft.jsonl"
LOCAL_PROMPTS = [f"prompts.path={TLDR_POSTS}", "prompts.hub_config="]
TRAIN_STEPS = ["train.max_steps=2", "train.eval_every=2", "train.save_every=2", "train.log_every=1",
               "train.use_gpu=false", "train.cpus_per_worker=1"]
PPO_CUTS = ["ppo.iterations=2", "ppo.checkpoint_every=1", "ppo.publish_every=1",
            "roles.gpus_per_actor=0", "roles.cpus_per_actor=0.4", "roles.rollout_workers=1",
            "roles.dtype=bf16"]
TWO_RANKS = "roles.learner_workers=2"  # configs with more learners; one-learner configs keep one
# The SmolLM2 chain runs on the real weights (converted offline, rlhf.models.offline) from the base
# model and the packaged MiniLM, not the runs/ folders of the chain before it.
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM_RL = (f"policy.name_or_path={SMOLLM}", f"reward.model.name_or_path={MINILM}", *PPO_CUTS)
# Configs that cannot run alone: the online loop waits for people's choices on a served policy.
RUN_ELSEWHERE = {"online_smollm": "benchmarks/online_real.py (Serve, a simulated person over HTTP, "
                                  "two cycles; docs/benchmarks.md)"}
LED = {key: "allenai/led-base-16384" for key in
       ("policy.name_or_path", "value.name_or_path", "reward.model.name_or_path")}


@dataclass(frozen=True)
class Case:
    """One shipped config and what this machine changes about its run."""

    config: str  # file stem in configs/
    job: str  # jobs/<job>.py
    models: dict[str, str] = field(default_factory=dict)  # config key -> hub name in model_configs/
    cuts: tuple[str, ...] = ()  # overrides beyond the model paths and output_dir
    variant: str = ""  # a setting no shipped config has, run on this config's base

    @property
    def name(self) -> str:
        return f"{self.config} [{self.variant}]" if self.variant else self.config


CASES = (
    Case("sft_tiny", "sft", cuts=("train.max_steps=2", "train.eval_every=2", "train.save_every=2")),
    Case("reward_tiny", "reward", cuts=("train.max_steps=2", "train.eval_every=2", "train.save_every=2")),
    Case("ppo_tiny", "ppo", cuts=("ppo.iterations=2",)),
    Case("sft_tldr", "sft", {"model.name_or_path": "google/flan-t5-base"},
         (f"data.path={TLDR_SFT}", "data.hub_config=", "data.min_rating=null",
          "train.batch_size=2", "train.dtype=bf16", "rouge_rows=2", *TRAIN_STEPS)),
    Case("sft_arxiv_led", "sft", {"model.name_or_path": "allenai/led-base-16384"},
         ("data.path={arxiv}", "data.hub_config=", "eval_data=null",
          "rouge_rows=0", "train.max_eval_rows=2", "train.grad_accum_steps=1", "train.dtype=bf16",
          "train.num_workers=2", *TRAIN_STEPS[1:], "train.max_steps=1")),
    Case("reward_minilm", "reward", cuts=(*TRAIN_STEPS, "train.batch_size=4", "train.max_eval_rows=8")),
    Case("ppo_tldr", "ppo", {"policy.name_or_path": "google/flan-t5-base",
                             "value.name_or_path": "google/flan-t5-base",
                             "reward.model.name_or_path": "google/flan-t5-base"},
         (*LOCAL_PROMPTS, *PPO_CUTS, "ppo.rollout_batch_size=4", "ppo.minibatch_size=2",
          "roles.weight_sync=object_store")),
    Case("ppo_tldr_large", "ppo", {"policy.name_or_path": "google/flan-t5-large",
                                   "value.name_or_path": "google/flan-t5-large",
                                   "reward.model.name_or_path": "google/flan-t5-large"},
         (*LOCAL_PROMPTS, *PPO_CUTS, TWO_RANKS, "ppo.rollout_batch_size=2", "ppo.minibatch_size=2")),
    Case("ppo_arxiv_led", "ppo", LED,
         ("prompts.path={arxiv}", "prompts.hub_config=", *PPO_CUTS, TWO_RANKS, "ppo.iterations=1",
          "ppo.rollout_batch_size=2", "ppo.minibatch_size=2", "ppo.epochs=1", "roles.forward_batch_size=1")),
    Case("ppo_arxiv_led", "ppo", LED,
         ("prompts.path={arxiv}", "prompts.hub_config=", *PPO_CUTS, TWO_RANKS, "ppo.iterations=1",
          "ppo.rollout_batch_size=2", "ppo.minibatch_size=2", "ppo.epochs=1", "ppo.max_new_tokens=128",
          "roles.deepspeed.offload_optimizer=false", "roles.deepspeed.offload_params=false",
          *(f"{role}.max_source_length=4096" for role in ("policy", "value", "reward.model"))),
         variant="ZeRO-3 without offload, 4,096 tokens"),
    Case("ppo_tldr", "ppo", {key: "facebook/bart-base" for key in LED},
         (*LOCAL_PROMPTS, *PPO_CUTS, TWO_RANKS, "ppo.rollout_batch_size=4", "ppo.minibatch_size=2",
          "roles.deepspeed.zero_stage=2", "roles.weight_sync=collective"),
         variant="BART-base, ZeRO-2, bf16, collective sync"),
    Case("reward_tiny", "reward", {"model.name_or_path": "allenai/led-base-16384"},
         ("augment.data.path={arxiv}", "model.max_source_length=4096", "model.max_target_length=256",
          "model.gradient_checkpointing=true", "train.num_workers=2", "train.deepspeed.zero_stage=3",
          "train.dtype=bf16", "train.batch_size=1", *TRAIN_STEPS, "train.max_steps=1"),
         variant="LED-base reward model, ZeRO-3 without offload, 4,096 tokens"),
    Case("sft_tldr_qwen", "sft", {"model.name_or_path": "Qwen/Qwen2.5-0.5B"},
         (f"data.path={TLDR_SFT}", "data.hub_config=", "data.min_rating=null",
          "train.batch_size=2", "train.dtype=bf16", "rouge_rows=2", *TRAIN_STEPS)),
    Case("reward_tldr_qwen", "reward", {"model.name_or_path": "Qwen/Qwen2.5-0.5B"},
         (f"data.path={TLDR_POSTS}", "data.hub_config=", "eval_data=null",
          "train.batch_size=2", "train.dtype=bf16", "train.max_eval_rows=8", *TRAIN_STEPS)),
    Case("ppo_tldr_qwen", "ppo", {"policy.name_or_path": "Qwen/Qwen2.5-0.5B",
                                  "value.name_or_path": "Qwen/Qwen2.5-0.5B",
                                  "reward.model.name_or_path": "Qwen/Qwen2.5-0.5B"},
         (*LOCAL_PROMPTS, *PPO_CUTS, "ppo.rollout_batch_size=4", "ppo.minibatch_size=2",
          "roles.weight_sync=object_store")),
    Case("sft_smollm", "sft", cuts=("train.dtype=bf16", *TRAIN_STEPS)),
    Case("sft_smollm_quick", "sft", cuts=("train.dtype=bf16", *TRAIN_STEPS)),
    Case("grpo_smollm", "ppo", cuts=SMOLLM_RL),
    Case("ppo_smollm", "ppo", cuts=SMOLLM_RL),
    Case("dpo_smollm", "dpo", cuts=(f"model.name_or_path={SMOLLM}", "train.dtype=bf16", *TRAIN_STEPS)),
    Case("serve_cluster", "serve", {"policy.name_or_path": "google/flan-t5-large"},
         ("store.url=sqlite:///{workdir}/feedback.db", "serve.gpus_per_replica=0",
          "serve.cpus_per_replica=1", "serve.min_replicas=1", "serve.max_replicas=1",
          "serve.host=127.0.0.1", "serve.port={port}", "registry={workdir}/registry")),
)


# --------------------------------------------------------------------------- models and data


def published_config(hub_name: str) -> dict:
    return json.loads((MODEL_CONFIGS / f"{hub_name.replace('/', '--')}.json").read_text())


def byte_tokenizer_config(hub_name: str):
    """The published config with the byte tokenizer's special ids (pad 0, eos 1)."""
    from transformers import AutoConfig

    values = published_config(hub_name)
    config = AutoConfig.for_model(**values)
    config.pad_token_id, config.eos_token_id = 0, 1
    config.bos_token_id = 1 if not config.is_encoder_decoder else None
    if config.is_encoder_decoder:
        config.decoder_start_token_id = 0
        config.forced_bos_token_id = config.forced_eos_token_id = None
    return config


def build_checkpoint(hub_name: str, folder: Path) -> Path:
    """Random weights of ``hub_name``'s architecture in its published dtype, saved once."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, ByT5Tokenizer

    path = folder / hub_name.replace("/", "--")
    if (path / "config.json").is_file():
        return path
    config = byte_tokenizer_config(hub_name)
    dtype = getattr(torch, str(published_config(hub_name).get("torch_dtype", "float32")))
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(config, dtype=dtype)
    model.save_pretrained(str(path))
    ByT5Tokenizer().save_pretrained(str(path))
    print(f"built {hub_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    return path


def long_papers(out: Path, source: Path, min_chars: int = 16384) -> Path:
    """The shared ArXiv sample cut to papers long enough for LED's 16,384-token window."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if len(r["article"].encode()) >= min_chars))
    return out


# --------------------------------------------------------------------------- memory estimate


def parameters(hub_name: str, head: bool) -> tuple[int, int]:
    """(parameters, largest tensor) of the LM (or the backbone + scalar head), on the meta device."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = byte_tokenizer_config(hub_name)
    lm = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = (AutoModel if head else lm).from_config(config)
    tensors = list(model.parameters())
    hidden = getattr(config, "d_model", None) or config.hidden_size
    return sum(t.numel() for t in tensors) + (hidden + 1 if head else 0), max(t.numel() for t in tensors)


def learner_estimate(case: Case, resolved: dict) -> dict | None:
    """DeepSpeed's model-state estimate for the case's learner ranks, and the frozen copies.

    On this CPU machine the "device" share of each rank is host memory too; DeepSpeed's host
    figure counts only where something is offloaded (otherwise it is the load-time copy).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if not case.models or case.job == "serve":
        return None
    section = resolved["roles"] if case.job == "ppo" else resolved["train"]
    zero = section["deepspeed"]
    policy_key = "policy.name_or_path" if case.job == "ppo" else "model.name_or_path"
    trained = [(case.models[policy_key], case.job == "reward")]
    if case.job == "ppo":
        trained.append((case.models["value.name_or_path"], True))
    counts = [parameters(name, head) for name, head in trained]
    total, largest = sum(c[0] for c in counts), max(c[1] for c in counts)
    ranks = section["learner_workers" if case.job == "ppo" else "num_workers"]
    if zero["zero_stage"] == 3:
        host, device, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=ranks, num_nodes=1, cpu_offload=zero["offload_optimizer"],
            cpu_offload_params=zero["offload_params"], zero_init=True, additional_buffer_factor=1.5)
    else:
        host, device = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=1 if zero["zero_stage"] == 0 else ranks, num_nodes=1,
            cpu_offload=zero["offload_optimizer"], additional_buffer_factor=1.5)
    offload = zero["offload_optimizer"] or zero["offload_params"]  # else the host figure is load time
    frozen = 0
    if case.job == "ppo":  # generator and reference (policy), reward model, in bf16
        frozen = 2 * (2 * parameters(case.models[policy_key], False)[0]
                      + parameters(case.models["reward.model.name_or_path"], True)[0])
    return {"zero_stage": zero["zero_stage"], "ranks": ranks, "offload": offload, "trained_parameters": total,
            "host_gib": host / GIB, "device_gib_per_rank": device / GIB, "frozen_gib": frozen / GIB,
            "machine_gib": ((host if offload else 0) + ranks * device + frozen) / GIB}


# --------------------------------------------------------------------------- memory per role


class RolePeaks:
    """High-water RSS of every process under ``root``, grouped by role, sampled in a thread."""

    def __init__(self, root: int, every_s: float = 0.5):
        self.root, self.every_s = psutil.Process(root), every_s
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, VmHWM bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def role(process: psutil.Process) -> str:
        title = (process.cmdline() or [process.name()])[0]
        if title.startswith("ray::"):
            return title[5:].split(".")[0].split(" ")[0]
        return "driver" if "jobs/" in " ".join(process.cmdline()) else "ray system"

    def _sample(self) -> None:
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                hwm = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
                role = self.role(process)
            except (psutil.Error, OSError, StopIteration):
                continue
            if role != "IDLE":
                known_role, known_peak = self.peaks.get(process.pid, (role, 0))
                role = known_role if role == "ray system" else role  # a worker before its title
                self.peaks[process.pid] = (role, max(known_peak, hwm * 1024))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._sample()
            except psutil.NoSuchProcess:
                return

    def stop(self) -> dict[str, float]:
        """GiB per role: the largest single process of that role."""
        self._stop.set()
        self._thread.join()
        roles: dict[str, float] = {}
        for role, peak in self.peaks.values():
            roles[role] = max(roles.get(role, 0.0), peak / GIB)
        return dict(sorted(roles.items()))


# --------------------------------------------------------------------------- running a case


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def overrides(case: Case, workdir: Path, models: Path, arxiv: Path, port: int) -> list[str]:
    paths = [f"{key}={build_checkpoint(name, models)}" for key, name in case.models.items()]
    cuts = [cut.format(workdir=workdir, arxiv=arxiv, port=port) for cut in case.cuts]
    return [f"output_dir={workdir / 'run'}", *paths, *cuts]


def resolved_config(case: Case, args: list[str]) -> dict:
    """The run's config as the job resolves it (``--print-config``-free: load it here)."""
    from rlhf.config.core import load_config
    from rlhf.dpo.config import DPOConfig
    from rlhf.online.config import OnlineConfig  # noqa: F401  (imports every job tree)
    from rlhf.ppo.config import PPOConfig
    from rlhf.serve.config import ServeConfig
    from rlhf.train.config import RewardConfig, SFTConfig

    cls = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig,
           "serve": ServeConfig}[case.job]
    cfg = load_config(cls, str(ROOT / "configs" / f"{case.config}.yaml"), args)
    return asdict(cfg)


def step_times(run_dir: Path) -> list[float]:
    """Seconds per PPO iteration, or the train loop's windowed seconds per step."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r.get("time_s", r.get("step_time_s")) for r in rows if "time_s" in r or "step_time_s" in r]


def serve_probe(port: int, deadline: float) -> dict:
    """Wait for the app, then a summary, a comparison and a choice; latencies and statuses.

    Random weights may write two empty (or equal) summaries, which the API refuses with a 503
    by design; the probe records it and stops there.
    """
    url = f"http://127.0.0.1:{port}"
    while time.time() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(2)
    document = {"text": json.loads((ROOT / TLDR_POSTS).read_text().splitlines()[0])["post"]}
    # A labeler token from the admin route (configs with serve.labeler_auth=true need one).
    admin = {"Authorization": f"Bearer {JOB_ENV['RLHF_ADMIN_TOKEN']}"}
    labeler = requests.post(url + "/admin/labelers", json={"name": "rehearsal"}, headers=admin, timeout=60)
    labeler.raise_for_status()
    auth = {"Authorization": f"Bearer {labeler.json()['token']}"}
    probe: dict = {}
    for route in ("/v1/summarize", "/v1/compare"):
        start = time.perf_counter()
        answer = requests.post(url + route, json=document, headers=auth, timeout=900)
        probe[route] = {"status": answer.status_code, "s": round(time.perf_counter() - start, 1)}
    requests.post(url + "/v1/summarize", json=document, headers=auth, timeout=900).raise_for_status()
    if probe["/v1/compare"]["status"] == 200:
        choice = {"comparison_id": answer.json()["comparison_id"], "choice": 0}
        stored = requests.post(url + "/v1/feedback", json=choice, headers=auth, timeout=60)
        probe["/v1/feedback"] = {"status": stored.status_code}
    else:
        probe["/v1/compare"]["detail"] = answer.json().get("detail", "")[:120]
    return probe


def failure_line(log: str) -> str:
    """The line that says why a job failed: Ray's out-of-memory kill if any, else the last line."""
    lines = [line for line in log.splitlines() if line.strip()]
    oom = [line for line in lines if "OutOfMemoryError" in line]
    return (oom or lines or ["no output"])[-1 if not oom else 0][:300]


def run_case(case: Case, workdir: Path, models: Path, arxiv: Path, timeout_s: float) -> dict:
    port = free_port()
    args = overrides(case, workdir, models, arxiv, port)
    row: dict = {"name": case.name, "config": case.config, "job": case.job, "cuts": list(case.cuts),
                 "models": dict(case.models)}
    row["estimate"] = learner_estimate(case, resolved_config(case, args))
    if row["estimate"] and row["estimate"]["machine_gib"] > MACHINE_BUDGET_GIB:
        e = row["estimate"]
        row["rc"], row["reason"] = None, (
            f"not run: ZeRO-{e['zero_stage']} model states of {e['trained_parameters'] / 1e9:.2f}B trained "
            f"parameters on {e['ranks']} ranks ({e['ranks']} x {e['device_gib_per_rank']:.1f} GiB) + "
            f"{e['frozen_gib']:.1f} GiB of frozen bf16 copies = {e['machine_gib']:.1f} GiB > "
            f"{MACHINE_BUDGET_GIB:g} GiB usable here")
        return row
    command = [sys.executable, f"jobs/{case.job}.py", "--config", f"configs/{case.config}.yaml", *args]
    log = (workdir / "job.log").open("w")
    start = time.time()
    # SIGINT back to its default: a shell starting this script in the background ignores it, and
    # the serve job would then never see the Ctrl-C that stops it.
    job = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **JOB_ENV}, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    peaks = RolePeaks(job.pid)
    try:
        if case.job == "serve":
            row["serve"] = serve_probe(port, start + timeout_s)
            job.send_signal(signal.SIGINT)
        row["rc"] = job.wait(timeout=max(60.0, start + timeout_s - time.time()))
    except (subprocess.TimeoutExpired, requests.RequestException) as err:
        row["rc"], row["reason"] = -1, f"{type(err).__name__}: {err}"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    row["peak_gib"] = peaks.stop()
    row["wall_s"] = round(time.time() - start, 1)
    row["step_s"] = [round(s, 2) for s in step_times(workdir / "run")]
    if row["rc"] not in (0, None) and "reason" not in row:
        row["reason"] = failure_line((workdir / "job.log").read_text())
    if case.job == "serve" and row["rc"] in (-signal.SIGINT, 130, 1):  # stopped by us after the probe
        row["rc"] = 0 if row.get("serve", {}).get("/v1/summarize", {}).get("status") == 200 else row["rc"]
    return row


WORK_ROLES = ("driver", "RayTrainWorker", "Learner", "Generator", "RewardScorer", "ReferenceScorer")


def role_peaks(peaks: dict[str, float]) -> str:
    """The working roles' peaks, then the largest of Ray's own processes (controllers, agents)."""
    named = [f"{role} {peaks[role]:.1f}" for role in WORK_ROLES if role in peaks]
    serving = {role: gib for role, gib in peaks.items() if role.startswith("ServeReplica")}
    named += [f"{role.split(':')[-1]} {gib:.1f}" for role, gib in serving.items()]
    rest = [gib for role, gib in peaks.items() if role not in WORK_ROLES and role not in serving]
    return ", ".join(named + ([f"Ray's own ≤ {max(rest):.1f}"] if rest else []))


def markdown(rows: list[dict]) -> str:
    lines = ["| config | model | rc | step / iteration (s) | wall (s) | peak RSS per role (GiB) | "
             "ZeRO estimate, learner (GiB) | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        model = ", ".join(sorted(set(r["models"].values()))) or "as configured"
        peaks = role_peaks(r.get("peak_gib", {}))
        e = r.get("estimate")
        estimate = (f"ZeRO-{e['zero_stage']}: {e['ranks']} x {e['device_gib_per_rank']:.1f}"
                    + (f" + {e['host_gib']:.1f} offloaded" if e["offload"] else "") if e else "")
        steps = ", ".join(f"{s:.1f}" for s in r.get("step_s", []))
        calls = [f"{route} {v['status']} {v.get('s', '')} s {v.get('detail', '')}".strip()
                 for route, v in r.get("serve", {}).items()]
        note = r.get("reason", "") or "; ".join(calls)
        lines.append(f"| {r['name']} | {model} | {r['rc']} | {steps} | {r.get('wall_s', '')} | {peaks} | "
                     f"{estimate} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="case names to run: \"stem\" or \"stem [variant]\"")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rehearsal"))
    parser.add_argument("--arxiv", type=Path,
                        default=ROOT.parent / "shared" / "data" / "arxiv_article_abstract.jsonl")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--estimate-only", action="store_true", help="print memory estimates, run nothing")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out, run nothing")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())["rows"]))
        return
    os.chdir(ROOT)  # configs name repository paths relative to the root, as the jobs run
    shipped = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    missing = sorted(set(shipped) - {c.config for c in CASES} - set(RUN_ELSEWHERE))
    if missing:
        raise SystemExit(f"configs without a rehearsal case: {missing}")
    models = args.workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    arxiv = long_papers(args.workdir / "arxiv_long.jsonl", args.arxiv)
    previous = json.loads(args.out.read_text())["rows"] if args.out and args.out.is_file() else []
    rows = {r["name"]: r for r in previous}
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        workdir = args.workdir / "".join(c if c.isalnum() or c in "-_" else "_" for c in case.name)
        if args.estimate_only:
            cut = overrides(case, workdir, models, arxiv, 8000)
            print(case.name, json.dumps(learner_estimate(case, resolved_config(case, cut))), flush=True)
            continue
        subprocess.run(["rm", "-rf", str(workdir)], check=True)
        workdir.mkdir(parents=True)
        rows[case.name] = run_case(case, workdir, models, arxiv, args.timeout_s)
        print(json.dumps(rows[case.name]), flush=True)
        if args.out:
            ordered = [rows[c.name] for c in CASES if c.name in rows]
            result = {"rows": ordered, "machine": platform.platform(), "cpus": os.cpu_count(),
                      "torch": torch.__version__}
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown([rows[c.name] for c in CASES if c.name in rows]))


if __name__ == "__main__":
    main()

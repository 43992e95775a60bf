"""Config tree: YAML + dotted overrides, type and bound errors with the key's name, --help."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml
from support.cli import run_cli
from support.paths import ROOT

from rlhf.config.core import (
    ConfigError,
    default_config,
    describe,
    load_config,
    option,
    parse_cli,
    save_config,
)
from rlhf.dpo.config import DPOConfig
from rlhf.eval.config import EvalConfig
from rlhf.metrics import flatten
from rlhf.online.config import OnlineConfig
from rlhf.ppo.config import PPOConfig
from rlhf.serve.config import ServeConfig
from rlhf.train.config import RewardConfig, SFTConfig


@dataclass
class Inner:
    rate: float = option(0.1, "A rate.", gt=0)
    kind: Literal["a", "b"] = option("a", "A kind.")


@dataclass
class Outer:
    name: str = option("x", "A name.")
    count: int = option(1, "A count.", ge=1)
    inner: Inner = option(factory=lambda: Inner(rate=0.5), help="Nested.")
    maybe: Inner | None = option(None, "Optional section.")


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("count: 3\ninner:\n  kind: b\n")
    cfg = load_config(Outer, str(f), ["inner.rate=0.25", "name=y"])
    assert (cfg.name, cfg.count, cfg.inner.rate, cfg.inner.kind) == ("y", 3, 0.25, "b")


def test_override_keeps_the_jobs_own_section_default() -> None:
    cfg = load_config(Outer, None, ["inner.kind=b"])
    assert cfg.inner.rate == 0.5  # from Outer's factory, not Inner's class default 0.1
    reward = load_config(RewardConfig, None, ["model.max_target_length=32"])
    assert reward.model.name_or_path == "tiny-gpt2"


def test_optional_section_built_from_overrides() -> None:
    cfg = load_config(Outer, None, ["maybe.rate=2"])
    assert cfg.maybe == Inner(rate=2.0, kind="a")


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("nope=1", "nope", "unknown key"),
        ("inner.nope=1", "inner.nope", "unknown key"),
        ("count=abc", "count", "expected an integer"),
        ("count=0", "count", "must be >= 1"),
        ("inner.rate=-0.1", "inner.rate", "must be > 0"),
        ("inner.kind=c", "inner.kind", "expected one of 'a', 'b', got 'c'"),
        ("train.deepspeed.zero_stage=true", "train.deepspeed.zero_stage", "expected one of 0, 1, 2, 3"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig if override.startswith("train.") else Outer, None, [override])
    assert err.value.key == key
    assert fragment in err.value.message


def test_job_configs_validate_relations_and_files() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr: must be > 0"):
        load_config(SFTConfig, None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"train\.batch_size: must be > 0"):
        load_config(SFTConfig, None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"data\.path: file not found"):
        load_config(SFTConfig, None, ["data.path=/nowhere/x.jsonl"])
    with pytest.raises(ConfigError, match=r"augment\.kinds\[0\]: expected one of 'other_summary'"):
        load_config(RewardConfig, None, ["augment.kinds=[blur]"])
    # A hub name is not checked as a file: its loader resolves it later.
    assert load_config(SFTConfig, None, ["model.name_or_path=allenai/led-base-16384"])


def test_every_key_is_documented() -> None:
    for cls in (SFTConfig, RewardConfig, EvalConfig, PPOConfig, ServeConfig, OnlineConfig):
        rows = describe(cls())
        assert rows, cls
        undocumented = [row.key for row in rows if not row.doc.strip()]
        assert not undocumented, undocumented


def test_save_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(SFTConfig, None, ["seed=7", "train.deepspeed.zero_stage=2"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["train"]["deepspeed"]["zero_stage"] == 2
    assert load_config(SFTConfig, str(path)) == cfg


def test_parse_cli_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(SFTConfig, ["train.lr=-1"], prog="sft.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sft.py: error: train.lr: must be > 0, got -1.0"]
    args = parse_cli(SFTConfig, ["--resume", "seed=3"], prog="sft.py", resumable=True)
    assert args.resume and args.config.seed == 3
    with pytest.raises(SystemExit) as exit_info:  # a job without checkpoints has nothing to resume
        parse_cli(EvalConfig, ["--resume"], prog="eval.py")
    assert exit_info.value.code == 2
    assert "--resume: unknown flag; allowed: --config FILE, --help" in capsys.readouterr().err


def test_job_cli_help_and_error_exit_codes() -> None:
    help_run = run_cli("sft.py", "--help")
    assert help_run.returncode == 0
    assert "train.deepspeed.zero_stage = 0" in help_run.stdout
    assert "DeepSpeed ZeRO stage" in help_run.stdout
    bad = run_cli("sft.py", "train.batch_size=0")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["sft.py: error: train.batch_size: must be > 0, got 0"]


def test_exponent_floats_without_a_dot_are_numbers() -> None:
    assert load_config(SFTConfig, None, ["train.lr=3e-3"]).train.lr == 0.003


# Configs that start from other jobs' outputs: stand-ins for those folders.
CHAINED = {
    "ppo_tldr.yaml": ["policy.name_or_path=tiny-t5", "value.name_or_path=tiny-t5",
                      "reward.model.name_or_path=tiny-gpt2"],
    "ppo_tldr_large.yaml": ["policy.name_or_path=tiny-t5", "value.name_or_path=tiny-t5",
                            "reward.model.name_or_path=tiny-t5"],
    "ppo_arxiv_led.yaml": ["policy.name_or_path=tiny-led", "value.name_or_path=tiny-led",
                           "reward.model.name_or_path=tiny-led"],
    "reward_tldr_qwen.yaml": ["model.name_or_path=tiny-gpt2"],
    "ppo_tldr_qwen.yaml": ["policy.name_or_path=tiny-gpt2", "value.name_or_path=tiny-gpt2",
                           "reward.model.name_or_path=tiny-gpt2"],
    **{name: ["policy.name_or_path=tiny-llama", "reward.model.name_or_path=tiny-gpt2"]
       for name in ("grpo_smollm.yaml", "ppo_smollm.yaml")},
    "dpo_smollm.yaml": ["model.name_or_path=tiny-llama"],
    "online_smollm.yaml": ["reward.model.name_or_path=tiny-gpt2"],
}


def _shared_paths_replaced(tree: dict, prefix: str = "") -> list[str]:
    """An override pointing every key that names a file under ../shared at a shipped sample."""
    stand_in = ROOT / "tests" / "fixtures" / "tldr_comparisons_sample.jsonl"
    overrides = []
    for key, value in tree.items():
        if isinstance(value, dict):
            overrides += _shared_paths_replaced(value, f"{prefix}{key}.")
        elif isinstance(value, str) and "../shared" in value:
            overrides.append(f"{prefix}{key}={stand_in}")
    return overrides


def test_every_shipped_yaml_config_loads() -> None:
    jobs = {"sft": SFTConfig, "reward": RewardConfig, "eval": EvalConfig, "ppo": PPOConfig,
            "grpo": PPOConfig, "dpo": DPOConfig, "serve": ServeConfig, "online": OnlineConfig}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cls = jobs[path.stem.split("_")[0]]
        text = path.read_text()
        # Files outside the repository (shared sample data) are checked where they exist.
        overrides = [] if (ROOT.parent / "shared").exists() else _shared_paths_replaced(yaml.safe_load(text))
        if path.name in CHAINED:
            if not (ROOT / "runs").exists():  # where the chain ran, its folders exist
                with pytest.raises(ConfigError, match="file not found: (/mnt/shared/)?runs/"):
                    load_config(cls, str(path), overrides)
            overrides += CHAINED[path.name]
        load_config(cls, str(path), overrides)


def test_ppo_config_checks_batch_division_and_reward_choice(tmp_path: Path) -> None:
    assert load_config(PPOConfig, None, []).reward.fn == "rlhf.ppo.rewards:brevity"
    with pytest.raises(ConfigError, match=r"ppo\.minibatch_size: 5 must divide rollout_batch_size \(16\)"):
        load_config(PPOConfig, None, ["ppo.minibatch_size=5"])
    with pytest.raises(ConfigError, match=r"reward\.fn: file not found: /nowhere/r\.py"):
        load_config(PPOConfig, None, ["reward.fn=/nowhere/r.py:score"])
    with pytest.raises(ConfigError, match=r"reward\.fn: no reward: set reward\.model\.name_or_path or"):
        load_config(PPOConfig, None, ["reward.fn="])
    # Naming a reward model is enough, on the command line or in a file: it replaces the default fn.
    cfg = load_config(PPOConfig, None, ["reward.model.name_or_path=tiny-gpt2"])
    assert (cfg.reward.model.name_or_path, cfg.reward.fn) == ("tiny-gpt2", "")
    f = tmp_path / "ppo.yaml"
    f.write_text("reward:\n  model:\n    name_or_path: tiny-gpt2\n")
    assert load_config(PPOConfig, str(f)).reward.fn == ""
    assert load_config(PPOConfig, str(f), ["reward.fn=", "reward.model.max_source_length=64"]).reward.fn == ""


def test_paths_with_two_slashes_are_checked_as_files() -> None:
    with pytest.raises(ConfigError, match=r"reward\.model\.name_or_path: file not found: runs/none/model"):
        load_config(PPOConfig, None, ["reward.model.name_or_path=runs/none/model"])


def test_serve_config_checks_replica_bounds_and_strategy() -> None:
    with pytest.raises(ConfigError, match=r"serve\.min_replicas: 5 exceeds max_replicas=4"):
        load_config(ServeConfig, None, ["serve.min_replicas=5"])
    with pytest.raises(ConfigError, match=r"serve\.compare_strategy"):
        load_config(ServeConfig, None, ["serve.compare_strategy=newest"])
    assert load_config(ServeConfig, None, ["serve.max_batch_size=1"]).serve.max_batch_size == 1


JOBS = {"sft.py": SFTConfig, "reward.py": RewardConfig, "eval.py": EvalConfig, "ppo.py": PPOConfig,
        "serve.py": ServeConfig, "online.py": OnlineConfig, "dpo.py": DPOConfig}


@functools.cache
def _help_outputs() -> dict[str, tuple[int, str]]:
    """{job file name: (exit code, stdout)} of every job's ``--help``."""
    return {job: (ran.returncode, ran.stdout) for job in sorted(JOBS) for ran in [run_cli(job, "--help")]}


def _help_rows(job: str) -> list[tuple[str, object, str]]:
    """(key, shown value, the null section it waits for or '') of each key line of ``job --help``."""
    code, stdout = _help_outputs()[job]
    assert code == 0, stdout
    rows = []
    for line in stdout.splitlines():
        if line.startswith("  ") and not line.startswith("      ") and " = " in line:
            key, _, shown = line.strip().partition(" = ")
            shown, _, waits_for = shown.partition("   (once ")
            rows.append((key, yaml.safe_load(shown), waits_for.removesuffix(" is set)")))
    return rows


@pytest.mark.parametrize("job", sorted(JOBS))
def test_help_shows_exactly_what_a_run_resolves_and_records(job: str, tmp_path: Path) -> None:
    # What run_main records in output_dir/config.yaml for a run with no overrides.
    recorded = yaml.safe_load(save_config(default_config(JOBS[job]), tmp_path / "config.yaml").read_text())
    resolved = flatten(recorded)
    rows = _help_rows(job)
    shown = {key: value for key, value, waits_for in rows if not waits_for}
    assert shown == resolved
    for key, _, waits_for in rows:  # keys of a section that is null until the user sets it
        if waits_for:
            assert key.startswith(waits_for + ".") and resolved[waits_for] is None, key


def test_help_shows_each_jobs_own_defaults_for_shared_sections() -> None:
    """The cases --help once got wrong by reading section classes instead of the job's defaults."""
    ppo = dict((k, v) for k, v, _ in _help_rows("ppo.py"))
    reward = dict((k, v) for k, v, _ in _help_rows("reward.py"))
    online = dict((k, v) for k, v, _ in _help_rows("online.py"))
    assert ppo["reward.fn"] == "rlhf.ppo.rewards:brevity"
    assert (reward["model.name_or_path"], reward["train.lr"]) == ("tiny-gpt2", 5e-4)
    assert (online["rl.ppo.iterations"], online["reward.train.max_steps"]) == (4, 20)


def test_a_reward_model_and_a_reward_fn_both_given_exit_2_naming_both() -> None:
    run = run_cli("ppo.py", "reward.model.name_or_path=tiny-gpt2", "reward.fn=rlhf.ppo.rewards:brevity")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "ppo.py: error: reward.model: reward.model and reward.fn ('rlhf.ppo.rewards:brevity') are both "
        "set; keep one"]


LEARNERS = {"sft.py": "train.", "reward.py": "train.", "ppo.py": "roles.", "online.py": "rl.roles.",
            "dpo.py": "train."}


@pytest.mark.parametrize("job", sorted(LEARNERS))
def test_bad_learner_settings_exit_2_with_the_same_message_in_every_job(job: str) -> None:
    section = LEARNERS[job] + "deepspeed."
    run = run_cli(job, f"{section}offload_params=true")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"{job}: error: {section}offload_params: needs zero_stage=3, got zero_stage=0"]
    with pytest.raises(ConfigError, match=rf"^{section}offload_optimizer: needs zero_stage 1, 2 or 3"):
        load_config(JOBS[job], None, [f"{section}offload_optimizer=true"])


@pytest.mark.parametrize(("cls", "roles"), [(PPOConfig, "roles."), (OnlineConfig, "rl.roles.")])
def test_role_settings_that_cannot_work_fail_in_config_validation(cls: type, roles: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{roles}learner_workers: 3 must divide ppo\.minibatch_size"):
        load_config(cls, None, [f"{roles}learner_workers=3"])
    with pytest.raises(ConfigError, match=rf"^{roles}weight_sync: collective needs a whole GPU per actor"):
        load_config(cls, None, [f"{roles}weight_sync=collective", f"{roles}gpus_per_actor=0.5"])
    if cls is OnlineConfig:  # the online reward update trains like jobs/reward.py
        with pytest.raises(ConfigError, match=r"^reward\.train\.deepspeed\.offload_params: needs zero"):
            load_config(cls, None, ["reward.train.deepspeed.offload_params=true"])


def test_jobs_hand_workers_absolute_model_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train workers run in another folder: a relative model folder must reach them absolute."""
    from rlhf.cli import prepare_models
    from rlhf.dpo.config import DPOConfig

    (tmp_path / "runs" / "sft" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DPOConfig, None, ["model.name_or_path=runs/sft/model"])
    prepare_models(cfg)
    assert cfg.model.name_or_path == str(tmp_path / "runs" / "sft" / "model")
    tiny = load_config(SFTConfig, None, ["model.name_or_path=tiny-gpt2"])
    prepare_models(tiny)
    assert tiny.model.name_or_path == "tiny-gpt2"  # presets and hub names stay names

"""DPO/IPO on the shared training loop with tiny policies: learning, the two reference modes,
config errors, the implicit-reward eval and an online method=dpo cycle. Resume is the shared
supervised loop's (tests/train/test_train.py resumes SFT to the same weights)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import get_args

import pytest
import torch
from support.cli import run_cli
from support.online import label_choices, online_config
from support.paths import ROOT
from support.serve import publish_tiny
from support.train import easy_preferences

from rlhf.config.core import ConfigError, load_config
from rlhf.config.sections import ModelConfig
from rlhf.data.schemas import Schema
from rlhf.data.sources import load_source
from rlhf.dpo.config import DPOConfig, ReferenceMode
from rlhf.dpo.task import REF_COLUMNS, DPOTask, run_dpo
from rlhf.eval.config import EvalConfig
from rlhf.eval.job import run_eval
from rlhf.models import load_policy
from rlhf.online.dpo_cycle import DPOCycle
from rlhf.online.loop import OnlineLoop
from rlhf.registry import PolicyRegistry
from rlhf.store import CycleLog, FeedbackStore
from rlhf.train.supervised_loop import TrainResult

STEPS = 8


def _metrics(output_dir: Path, event: str) -> list[dict]:
    rows = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["event"] == event]


def _dpo_config(tmp_path: Path, data: Path, *overrides: str) -> DPOConfig:
    """Validation on the training pairs themselves: the test asks whether DPO fits them."""
    return load_config(DPOConfig, None, [
        f"output_dir={tmp_path}", f"data.path={data}", f"eval_data.path={data}",
        "model.max_source_length=32", "model.max_target_length=16", "train.batch_size=8",
        "train.lr=5e-3", "train.lr_schedule=constant", "train.log_every=1", f"train.max_steps={STEPS}",
        f"train.eval_every={STEPS}", f"train.save_every={STEPS}", "dpo.beta=0.5", *overrides,
    ])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return easy_preferences(tmp_path_factory.mktemp("dpo") / "easy.jsonl", 32)


@pytest.fixture(scope="module")
def t5_run(ray_local, pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-t5 with the cached reference: what the t5 tests read."""
    output_dir = tmp_path_factory.mktemp("t5")
    run_dpo(_dpo_config(output_dir, pairs, "model.name_or_path=tiny-t5"))
    return output_dir


def _assert_learned(output_dir: Path) -> None:
    evals, train = _metrics(output_dir, "eval"), _metrics(output_dir, "train")
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-4)  # pi == ref
    assert evals[0]["val_accuracy"] == 0.0 and evals[-1]["val_accuracy"] >= 0.9, evals
    assert evals[-1]["val_loss"] < math.log(2) - 0.2 and evals[-1]["val_margin"] > 0, evals
    assert train[-1]["loss"] < train[0]["loss"] - 0.2, train
    assert {"chosen_logps", "rejected_logps", "accuracy", "margin"} <= set(train[-1])
    assert {"val_chosen_logps", "val_rejected_logps"} <= set(evals[-1])


def test_dpo_on_a_seq2seq_policy_fits_its_pairs_and_saves_a_policy(t5_run: Path) -> None:
    _assert_learned(t5_run)
    assert [r["step"] for r in _metrics(t5_run, "train")] == list(range(1, STEPS + 1))
    assert [r["step"] for r in _metrics(t5_run, "eval")] == [0, STEPS]
    policy = load_policy(ModelConfig(name_or_path=str(t5_run / "model"), max_target_length=8))
    assert policy.is_encoder_decoder and len(policy.generate(["post about cat"], do_sample=False)) == 1


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-gpt2"])
def test_cached_and_online_reference_give_the_same_first_loss(pairs: Path, preset: str) -> None:
    """The task's loss on one batch of the initial policy, without the loop: the cached columns
    (what ``prepare`` adds in each rank before step 0, here in chunks of 3) and the online frozen
    copy must agree, at pi == ref."""
    cfg = _dpo_config(pairs.parent, pairs, f"model.name_or_path={preset}")
    rows = load_source(cfg.data, Schema.PREFERENCE).table.slice(0, 8)
    losses = {}
    for mode in get_args(ReferenceMode):
        algo = dataclasses.replace(cfg.dpo, reference=mode)
        task = DPOTask(cfg.model, algo, 3, cfg.train.dtype)
        model = task.build_model().eval()
        with torch.no_grad():
            table = task.prepare(model, rows)
        added = set(table.column_names) - set(rows.column_names)
        assert added == (set(REF_COLUMNS) if mode == "cached" else set()) and table.num_rows == 8
        losses[mode] = task.loss(model.train(), table.to_pydict())
    (cached, cached_metrics), (online, online_metrics) = losses["cached"], losses["online"]
    assert online.item() == pytest.approx(cached.item(), abs=1e-5)
    assert online.item() == pytest.approx(math.log(2), abs=1e-4) and cached.requires_grad
    assert online_metrics == pytest.approx(cached_metrics, abs=1e-4)


def test_eval_scores_a_dpo_policy_as_an_implicit_reward_model(t5_run: Path, pairs: Path) -> None:
    cfg = load_config(EvalConfig, None, [
        f"output_dir={t5_run / 'eval'}", f"comparisons.path={pairs}",
        f"dpo_policy.name_or_path={t5_run / 'model'}", "dpo_policy.max_source_length=32",
        "dpo_policy.max_target_length=16", "dpo_reference.name_or_path=tiny-t5",
        "dpo_reference.max_source_length=32", "dpo_reference.max_target_length=16", "dpo_beta=0.5",
    ])
    run_eval(cfg)
    report = json.loads((t5_run / "eval" / "eval.json").read_text())
    assert report["rows"] == 32 and report["accuracy"] >= 0.9
    for key in ("length_baseline_accuracy", "similar_length_accuracy", "similar_length_10_rows",
                "similar_length_20_accuracy", "similar_length_20_baseline_accuracy", "length_correlation"):
        assert key in report, key


@pytest.mark.parametrize(("override", "line"), [
    ("dpo.beta=0", "dpo.py: error: dpo.beta: must be > 0, got 0.0"),
    ("dpo.loss=ipo dpo.label_smoothing=0.1",
     "dpo.py: error: dpo.label_smoothing: applies to loss=sigmoid only; set it to 0 for ipo"),
])
def test_bad_dpo_settings_exit_2_with_one_line(override: str, line: str, tmp_path: Path) -> None:
    run = run_cli("dpo.py", f"output_dir={tmp_path}", *override.split())
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [line], run.stderr


def test_dpo_config_relations() -> None:
    with pytest.raises(ConfigError, match=r"^dpo\.label_smoothing: must be below 0\.5"):
        load_config(DPOConfig, None, ["dpo.label_smoothing=0.5"])
    with pytest.raises(ConfigError, match=r"^data: no training data"):
        load_config(DPOConfig, None, ["data=null"])
    with pytest.raises(ConfigError, match=r"^dpo_reference: a dpo_policy needs the reference"):
        load_config(EvalConfig, None, [f"comparisons.path={ROOT / 'tests' / 'fixtures' / 'bad_rows.jsonl'}",
                                        "dpo_policy.name_or_path=tiny-t5"])


class Killed(Exception):
    """Stands in for the job being killed mid-cycle."""


def _killed(*_args, **_kwargs):
    raise Killed


def test_an_online_dpo_cycle_resumes_to_publish_and_the_gate_rejects_a_worse_update(
    ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cycle 1 is killed after its DPO update, before publishing: the restarted job publishes that
    update without training again. Cycle 2's update (cycle 1's policy again) scores worse on
    held-out choices: not published."""
    publish_tiny(tmp_path / "registry", seed=1)
    # Half the ids held out: with 24 random comparison ids, fewer than 2 held out has odds ~1e-6
    # (at the default fraction it was ~3%, and the gate then had nothing to judge).
    settings = ("method=dpo", "feedback.min_holdout=2", "feedback.holdout_fraction=0.5",
                "dpo.reference=online", "dpo_train.max_steps=2",
                "dpo_train.batch_size=4", "dpo_train.eval_every=2", "dpo_train.save_every=2",
                "rl.policy.max_source_length=64", "rl.policy.max_target_length=24")
    cfg = online_config(tmp_path, *settings)
    store, registry = FeedbackStore(cfg.store.url), PolicyRegistry(tmp_path / "registry")
    labelled = label_choices(store, 24)
    with monkeypatch.context() as patch:
        patch.setattr(DPOCycle, "publish", _killed)
        with pytest.raises(Killed):
            OnlineLoop(cfg).run()
    (interrupted,) = CycleLog(store).all()
    assert interrupted.stage == "reward_done" and registry.versions() == ["v0001"]

    with monkeypatch.context() as patch:
        patch.setattr("rlhf.online.dpo_cycle.train_dpo_policy", _killed)  # a resume must not train again
        (cycle,) = OnlineLoop(cfg).run()
    record = cycle.record
    assert cycle.done and set(record.new_ids) | set(record.holdout_ids) == set(labelled)
    assert record.dpo_judged and record.dpo_kept  # judged on >= 2 held-out choices
    assert record.accuracy_before is not None and record.accuracy_after is not None
    assert record.dpo_policy == interrupted.record.dpo_policy and record.dpo_policy.endswith("dpo/model")
    assert registry.versions() == ["v0001", "v0002"] and record.policy_version == "v0002"
    assert not (tmp_path / "online" / "reward_registry").exists()  # no reward model in method=dpo
    policy = load_policy(ModelConfig(name_or_path=str(registry.latest()), max_target_length=8))
    assert policy.generate(["a post"], do_sample=False)

    # Cycle 2 judges cycle 1's trained policy again, as its own update (a second DPO run on Ray
    # Train would cost ~25 CPU-s and test nothing cycle 1 did not): the gate is what is under test.
    trained = Path(record.dpo_policy)
    again = TrainResult(trained, trained.parent, trained.parent / "metrics.jsonl")
    monkeypatch.setattr("rlhf.online.dpo_cycle.train_dpo_policy", lambda *_args, **_kwargs: again)
    label_choices(store, 24, offset=24)
    measured = DPOCycle.health

    def worse_after_training(method: DPOCycle, policy: str, window, probe):
        health = measured(method, policy, window, probe)  # the real measurement, made to look 0.5 worse
        trained = policy.endswith("dpo/model")
        return dataclasses.replace(health, accuracy=health.accuracy - 0.5) if trained else health

    monkeypatch.setattr(DPOCycle, "health", worse_after_training)
    strict = online_config(tmp_path, *settings, "cycles=2", "feedback.max_accuracy_drop=0.1")
    (rejected,) = OnlineLoop(strict).run()
    assert rejected.cycle == 2 and rejected.done
    assert rejected.record.dpo_judged and not rejected.record.dpo_kept
    assert rejected.record.accuracy_after < rejected.record.accuracy_before
    assert registry.versions() == ["v0001", "v0002"]  # Serve keeps the version it had
    assert rejected.record.policy_version is None
    assert "rejected by the held-out gate" in rejected.record.publish_skipped

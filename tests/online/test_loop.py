"""The online loop in-process on a local Ray: feedback windows, a full cycle, and resuming a cycle
killed between its reward update and its PPO run."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest
from support.online import label_choices, online_config
from support.paths import ROOT
from support.serve import publish_tiny

from rlhf.config.core import load_config, parse_cli
from rlhf.data.holdout import in_holdout
from rlhf.online.config import OnlineConfig
from rlhf.online.cycle import keep_update
from rlhf.online.loop import OnlineLoop
from rlhf.online.reward_cycle import RewardModelCycle
from rlhf.online.window import read_window
from rlhf.registry import PolicyRegistry
from rlhf.store import CycleLog, CycleRecord, FeedbackStore, PPOSummary
from rlhf.store.tables import online_cycles, utcnow

DATA = ROOT / "tests" / "fixtures" / "tldr_sft_sample.jsonl"


def test_holdout_is_a_stable_fraction_of_ids():
    ids = [f"id-{k}" for k in range(2000)]
    held = [i for i in ids if in_holdout(i, 0.2)]
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == [i for i in ids if in_holdout(i, 0.2)]
    assert not any(in_holdout(i, 0.0) for i in ids)


def test_windows_tile_the_choices_and_replay_only_older_ones(tmp_path: Path):
    store = FeedbackStore(f"sqlite:///{tmp_path}/feedback.db")
    first = label_choices(store, 30)
    middle = utcnow()
    second = label_choices(store, 20, offset=30)
    end = utcnow()
    one = read_window(store, None, middle, 0.2, 1.0, seed=1)
    two = read_window(store, middle, end, 0.2, 1.0, seed=2)
    assert set(one.new_ids) | set(one.holdout_ids) == set(first)
    assert set(two.new_ids) == {i for i in second if not in_holdout(i, 0.2)}
    assert set(two.replay_ids) <= set(one.new_ids) and len(two.replay_ids) == len(two.new_ids)
    assert not set(one.holdout_ids) & (set(one.new_ids) | set(two.new_ids) | set(two.replay_ids))
    assert read_window(store, middle, end, 0.2, 1.0, seed=2) == two  # a resumed cycle sees the same rows
    assert two.train.num_rows == len(two.new_ids) + len(two.replay_ids)
    assert set(two.train.column("source").to_pylist()) == {"feedback"}


def test_the_reward_gate_judges_only_with_enough_held_out_choices():
    overrides = ["feedback.min_holdout=16", "feedback.max_accuracy_drop=0.02"]
    fb = load_config(OnlineConfig, None, overrides).feedback
    assert keep_update(0.80, 0.79, 16, fb) == (True, True)  # within the allowed drop
    assert keep_update(0.80, 0.70, 16, fb) == (True, False)  # fell too far: rejected
    assert keep_update(0.80, 0.70, 15, fb) == (False, True)  # too few rows to judge
    assert keep_update(None, None, 0, fb) == (False, True)


def test_the_rl_estimator_is_rl_ppo_advantage_with_its_own_kl_defaults_checked_before_ray(capsys):
    """method=reward_model with rl.ppo.advantage=grpo resolves as jobs/ppo.py would (KL in the loss as
    k3 unless given), and GRPO's k >= 2 check fails jobs/online.py's parse, before Ray starts."""
    grpo = parse_cli(OnlineConfig, ["rl.ppo.advantage=grpo", "rl.ppo.samples_per_document=4"],
                     prog="online.py").config
    assert (grpo.method, grpo.rl.ppo.kl_in, grpo.rl.ppo.kl_kind) == ("reward_model", "loss", "k3")
    given = load_config(OnlineConfig, None, ["rl.ppo.advantage=grpo", "rl.ppo.samples_per_document=4",
                                             "rl.ppo.kl_kind=k2"])
    assert (given.rl.ppo.kl_in, given.rl.ppo.kl_kind) == ("loss", "k2")
    smollm = load_config(OnlineConfig, str(ROOT / "configs" / "online_smollm.yaml"),
                         ["reward.model.name_or_path=tiny-gpt2"])
    assert (smollm.method, smollm.rl.ppo.advantage, smollm.rl.ppo.kl_in, smollm.rl.ppo.kl_kind) == (
        "reward_model", "grpo", "loss", "k3")
    with pytest.raises(SystemExit) as exited:
        parse_cli(OnlineConfig, ["rl.ppo.advantage=grpo"], prog="online.py")
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(
        "online.py: error: rl.ppo.samples_per_document: ppo.advantage=grpo needs >= 2 summaries")


def test_cycle_records_round_trip_through_json_and_the_ledger(tmp_path: Path) -> None:
    started = CycleRecord(watermark_since=None, watermark_until="2025-01-01T00:00:00+00:00",
                          policy_before="tiny-t5", reward_before="tiny-gpt2")
    done = dataclasses.replace(
        started, new_ids=["a", "b"], replay_ids=[], holdout_ids=["c"], accuracy_before=None,
        accuracy_after=None, reward_judged=False, reward_kept=True, reward_used="/r/v0001", documents=2,
        policy_version="v0002", ppo_first=PPOSummary(0.1, 0.0, 8.0), ppo_last=PPOSummary(0.3, 1.5, 7.5),
    )
    keys = {"watermark_since", "watermark_until", "policy_before", "reward_before", "new_ids", "replay_ids",
            "holdout_ids", "accuracy_before", "accuracy_after", "reward_judged", "reward_kept", "reward_used",
            "dpo_judged", "dpo_kept", "dpo_policy", "documents", "policy_version", "ppo_first", "ppo_last",
            "publish_skipped", "excluded_low_gold_accuracy",
            "excluded_unscored", "calibration_before", "calibration_after", "probe_drift", "candidate",
            "guard"}
    for record in (started, done):
        as_json = json.loads(json.dumps(record.to_record()))
        assert set(as_json) == keys and CycleRecord.from_record(as_json) == record
    assert done.to_record()["ppo_last"] == {"reward_mean": 0.3, "kl_mean": 1.5, "response_length_mean": 7.5}

    store = FeedbackStore(f"sqlite:///{tmp_path}/feedback.db")
    ledger = CycleLog(store)
    assert ledger.start(1, None, utcnow(), started).record == started
    assert ledger.advance(1, "done", done).record == done
    with pytest.raises(ValueError, match="stage must be one of"):
        ledger.advance(1, "finished", done)  # type: ignore[arg-type]
    # A row written by older code holds only the keys set so far (here: at "started").
    old = {"watermark_since": None, "watermark_until": "2025-01-01T00:00:00+00:00",
           "policy_before": "tiny-t5", "reward_before": "tiny-gpt2"}
    with store.write() as conn:
        conn.execute(online_cycles.insert().values(cycle=2, until=utcnow(), stage="started",
                                                   record=json.dumps(old), started_at=utcnow()))
    assert [(c.stage, c.record) for c in ledger.all()] == [("done", done), ("started", started)]
    # Older code wrote why PPO did not run under "ppo" (now publish_skipped).
    older_done = {**old, "ppo": "published before a restart"}
    assert CycleRecord.from_record(older_done).publish_skipped == "published before a restart"


class Killed(Exception):
    """Stands in for the job being killed mid-cycle."""


def test_a_cycle_killed_before_ppo_resumes_without_retraining_and_the_next_takes_only_new_rows(
    ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    publish_tiny(tmp_path / "registry", seed=1)
    cfg = online_config(tmp_path)
    store = FeedbackStore(cfg.store.url)
    first = label_choices(store, 24)

    def killed(*_args, **_kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(RewardModelCycle, "publish", killed)
        with pytest.raises(Killed):
            OnlineLoop(cfg).run()
    ledger = CycleLog(store)
    (cycle,) = ledger.all()
    assert cycle.stage == "reward_done" and cycle.record.reward_kept
    rewards = PolicyRegistry(tmp_path / "online" / "reward_registry")
    assert rewards.versions() == ["v0001"]

    resumed = OnlineLoop(cfg).run()  # a restarted job: finishes cycle 1, does not start cycle 2
    assert [c.cycle for c in resumed] == [1] and resumed[0].done
    assert rewards.versions() == ["v0001"]  # the reward update was not run again
    assert PolicyRegistry(tmp_path / "registry").versions() == ["v0001", "v0002"]
    record = resumed[0].record
    assert record.policy_version == "v0002" and record.documents == 24
    assert set(record.new_ids) | set(record.holdout_ids) == set(first)
    assert record.accuracy_before is not None and record.accuracy_after is not None
    assert record.reward_judged is False  # fewer held-out choices than feedback.min_holdout
    assert record.ppo_first is not None and record.ppo_last.response_length_mean > 0
    assert record.guard is not None and record.guard.refused == []  # checked, and passed
    assert record.calibration_after is not None and record.probe_drift is not None

    log = [json.loads(line) for line in (tmp_path / "online" / "cycles.jsonl").read_text().splitlines()]
    assert [entry["cycle"] for entry in log] == [1]
    assert CycleRecord.from_record({k: v for k, v in log[0].items() if k != "cycle"}) == record

    # The next cycle's reward update takes only the new rows: its window, read as the update reads
    # it, once the cycle is recorded (killed at the reward training, whose run cycle 1 tested).
    second = label_choices(store, 20, offset=24)
    with monkeypatch.context() as patch:
        patch.setattr("rlhf.online.reward_cycle.train_reward_model", killed)
        with pytest.raises(Killed):
            OnlineLoop(online_config(tmp_path, "cycles=2")).run()
    next_cycle = ledger.all()[-1]
    assert (next_cycle.cycle, next_cycle.stage, next_cycle.since) == (2, "started", resumed[0].until)
    window = OnlineLoop(online_config(tmp_path, "cycles=2")).context.window(next_cycle)
    assert set(window.new_ids) == {i for i in second if i not in window.holdout_ids}
    assert not set(window.new_ids) & set(record.new_ids)  # nothing trained on twice as new
    assert window.replay_ids and set(window.replay_ids) <= set(record.new_ids)
    assert next_cycle.until - next_cycle.since > timedelta(0)


def test_waiting_for_feedback_gives_up_after_max_wait(tmp_path: Path):
    from rlhf.online.loop import FeedbackTimeout

    cfg = online_config(tmp_path, "feedback.max_wait_s=0.5")
    label_choices(FeedbackStore(cfg.store.url), 3)
    with pytest.raises(FeedbackTimeout, match=r"feedback\.max_wait_s: only 3 of 16 new choices"):
        OnlineLoop(cfg).run()

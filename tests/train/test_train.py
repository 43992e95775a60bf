"""SFT and reward training on Ray Train + DeepSpeed with tiny models on sample data."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from support.cli import run_cli
from support.paths import ROOT
from support.train import easy_preferences

from rlhf.config.core import load_config
from rlhf.config.sections import ModelConfig
from rlhf.models import load_reward_model
from rlhf.train.config import RewardConfig, SFTConfig
from rlhf.train.reward import RewardTask, bradley_terry_loss, reward_data, run_reward
from rlhf.train.sft import run_sft
from rlhf.train.supervised_loop import STATE_FILE, epoch_batches, rank_shard
from rlhf.train.zero_gather import no_gather

DATA = ROOT / "tests" / "fixtures"

pytestmark = pytest.mark.usefixtures("ray_local")


def _evals(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "eval"]


def _wait_for_no_train_controller(timeout_s: float) -> list[str]:
    """Ray Train controllers still running under this process after ``timeout_s``: none expected."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                command = " ".join(proc.cmdline()).strip()
                if "TrainController" in command:
                    left.append(f"{proc.pid} {command}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _sft_config(tmp_path: Path, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"output_dir={tmp_path}", f"data.path={DATA / 'tldr_sft_sample.jsonl'}", "data.limit=40",
        "model.max_source_length=192", "model.max_target_length=48", "rouge_rows=2",
        "train.batch_size=4", "train.lr=3e-3", "train.log_every=2", *overrides,
    ])


def _assert_sft_learned(output_dir: Path, model_dir: Path) -> None:
    evals = _evals(output_dir)
    assert [e["step"] for e in evals] == [0, 12]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    assert {"rouge1", "rouge2", "rougeL"} <= set(evals[-1])
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin"))


def test_sft_learns_logs_from_rank_0_to_mlflow_and_resumes_at_the_same_step_with_the_same_weights(
    tmp_path: Path,
) -> None:
    """A causal policy learns in 12 steps, logged by Ray Train's rank-0 worker to MLflow (the training
    jobs' one real run with a tracker, rlhf.tracking); a run killed after step 6 resumes there and
    ends with the same weights as the run that was never stopped. Seq2seq SFT on Ray Train:
    tests/models/test_lora.py."""
    common = ("model.name_or_path=tiny-gpt2", "train.lr_schedule=constant", "train.max_steps=12",
              "train.eval_every=12", "train.save_every=6")
    ctrl_c = signal.getsignal(signal.SIGINT)
    straight = run_sft(_sft_config(tmp_path / "a", *common, "tracking.backends=[mlflow]"))
    # Ray Train's fit() swaps the Ctrl-C handler for one holding its TrainController, which kept
    # that process alive after the run; run_training puts the handler back, so the process ends.
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    assert _wait_for_no_train_controller(timeout_s=60) == []
    _assert_sft_learned(tmp_path / "a", straight.model_dir)
    _assert_logged_to_mlflow(tmp_path / "a", straight.model_dir)

    # The straight run's step-6 checkpoint, alone in a new output dir, is what a run killed after
    # step 6 would have left.
    (step_6,) = [state.parent for state in (tmp_path / "a").glob(f"ray_train-*/checkpoint_*/{STATE_FILE}")
                 if json.loads(state.read_text())["step"] == 6]
    shutil.copytree(step_6, tmp_path / "b" / "ray_train-killed" / step_6.name)
    resumed = run_sft(_sft_config(tmp_path / "b", *common), resume=True)
    train_steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").open()
                   if json.loads(line)["event"] == "train"]
    assert train_steps == [8, 10, 12]  # resumed at 6: no step is trained twice
    a = load_file(straight.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def _assert_logged_to_mlflow(output_dir: Path, model_dir: Path) -> None:
    """One finished MLflow run named after ``output_dir`` with metrics.jsonl's history, the config
    as params and the final model as artifacts; no TensorBoard (only when listed)."""
    from mlflow.tracking import MlflowClient

    written = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    client = MlflowClient(f"sqlite:///{output_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])
    assert (run.info.run_name, run.info.status) == (output_dir.name, "FINISHED")  # named after output_dir
    for key in ("loss", "val_loss"):
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert history == [(row["step"], row[key]) for row in written if key in row], key
    assert run.data.params["train.max_steps"] == "12" and run.data.params["model.name_or_path"] == "tiny-gpt2"
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert model_files == {p.name for p in model_dir.iterdir()}  # the final model, as copied
    assert not (output_dir / "tensorboard").exists()


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        run_sft(_sft_config(tmp_path, "train.max_steps=1"), resume=True)


def test_ranks_get_equal_contiguous_shares_and_epochs_replay_their_order() -> None:
    table = pa.table({"i": list(range(10))})
    assert [rank_shard(table, r, 3)["i"].to_pylist() for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    cfg = SFTConfig().train
    cfg.batch_size = 4
    epoch = [batch["i"] for batch in epoch_batches(table, cfg, seed=7, epoch=0)]
    assert [len(b) for b in epoch] == [4, 4]  # the last 2 rows do not fill a batch: left out
    assert len({i for b in epoch for i in b}) == 8  # no row twice
    assert [b["i"] for b in epoch_batches(table, cfg, seed=7, epoch=0)] == epoch  # resume replays it
    assert [b["i"] for b in epoch_batches(table, cfg, seed=7, epoch=1)] != epoch  # each epoch reshuffles


def test_bradley_terry_loss_matches_hand_computed_values() -> None:
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([0.0, 1.0])
    loss, accuracy, margin = bradley_terry_loss(chosen, rejected)
    # -log sigmoid(2) = 0.126928, -log sigmoid(-1) = 1.313262
    assert loss.item() == pytest.approx((0.126928 + 1.313262) / 2, abs=1e-5)
    assert accuracy.item() == 0.5
    assert margin.item() == pytest.approx(0.5)


def test_reward_model_learns_an_easy_preference_with_zero3_on_two_workers(tmp_path: Path) -> None:
    """The preference is learned with the state partitioned over two ZeRO-3 ranks, and saved whole."""
    data = easy_preferences(tmp_path / "easy.jsonl", 96)
    cfg = load_config(RewardConfig, None, [
        f"output_dir={tmp_path / 'run'}", f"data.path={data}", "model.max_source_length=64",
        "model.max_target_length=32", "train.batch_size=8", "train.lr=2e-3", "train.max_steps=24",
        "train.eval_every=24", "train.save_every=24", "train.num_workers=2", "train.cpus_per_worker=1",
        "train.deepspeed.zero_stage=3",
    ])
    result = run_reward(cfg)
    evals = _evals(tmp_path / "run")
    assert evals[-1]["val_accuracy"] >= 0.9, evals
    shards = sorted(p.name for p in (result.checkpoint_dir / "deepspeed").glob("*optim_states.pt"))
    assert len(shards) == 2 and "zero_pp_rank_1" in shards[1], shards  # state split over 2 ranks
    model = load_reward_model(ModelConfig(name_or_path=str(result.model_dir)))
    whole = load_reward_model(ModelConfig(name_or_path=cfg.model.name_or_path))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in whole.parameters())
    assert model.stats["total"].std > 0 and model.stats["total"].mean != 0.0
    scores = model.score(["post about cat"] * 2, ["cat dog rent job", "#$%&*@!?#$%&"])
    assert scores[0] > scores[1]

    # The online loop continues from an existing reward checkpoint: a reward job's task started
    # from the saved folder already separates the pairs, so backbone and head were both restored.
    more = load_config(RewardConfig, None, [
        f"output_dir={tmp_path / 'more'}", f"data.path={data}", f"model.name_or_path={result.model_dir}",
        "model.max_source_length=64", "model.max_target_length=32", "train.batch_size=8",
    ])
    task = RewardTask(more.model, more.train.batch_size, more.seed, more.heads, more.lora)
    model = task.build_model().eval()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    with torch.no_grad():
        first_eval = task.evaluate(model, {key: [row[key] for row in rows] for key in rows[0]})
    assert first_eval["val_accuracy"] >= 0.9, first_eval


def test_minilm_reward_config_builds_a_real_backbone_that_trains_saves_and_loads(tmp_path: Path) -> None:
    """configs/reward_minilm.yaml's model through the reward task as a rank drives it (loss, step,
    save), in this process: its real pretrained BERT weights, whole after saving. Its Ray Train run
    is benchmarks/rehearsal.py's reward_minilm; ZeRO-3 over two ranks is the easy-preference test's."""
    cfg = load_config(RewardConfig, str(ROOT / "configs" / "reward_minilm.yaml"), [
        f"output_dir={tmp_path}", f"data.path={DATA / 'tldr_comparisons_sample.jsonl'}",
        "model.max_source_length=128", "train.batch_size=4",
    ])
    task = RewardTask(cfg.model, cfg.train.batch_size, cfg.seed, cfg.heads, cfg.lora)
    model = task.build_model().train()
    batch = reward_data(cfg)[0].slice(0, 4).to_pydict()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss, _ = task.loss(model, batch)
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=cfg.train.lr).step()
    moved = {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "backbone" in moved and len(moved) >= 2, moved  # the pretrained backbone trains, and the head
    task.finalize(model)
    task.save(model, tmp_path / "model", no_gather)
    saved = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "model")))
    assert saved.backbone.config.model_type == "bert" and saved.backbone.config.num_hidden_layers == 6
    assert sum(p.numel() for p in saved.parameters()) > 20_000_000
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[name]) for name, p in saved.named_parameters())
    assert saved.score(["d"], ["s"]).shape == (1,)


def test_bad_data_stops_the_job_with_one_line(tmp_path: Path) -> None:
    run = run_cli("reward.py", f"output_dir={tmp_path}", f"data.path={DATA / 'bad_rows.jsonl'}",
                  "data.strict=true")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad_rows.jsonl" in lines[0] and "row" in lines[0], run.stderr


def test_reward_data_mixes_files_feedback_database_and_synthetic_pairs(tmp_path: Path) -> None:
    from rlhf.store import FeedbackStore

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    for i in range(10):
        doc = store.add_document(f"document number {i}")
        comparison = store.create_comparison(doc, f"good summary {i}", f"bad {i}", "v0001", "v0002")
        if i < 8:  # two stay pending and must not be trained on
            store.record_choice(comparison, 0)
    cfg = load_config(RewardConfig, None, [
        f"output_dir={tmp_path}", f"data.path={DATA / 'tldr_comparisons_sample.jsonl'}",
        "from_store=true", f"store.url={url}", f"augment.data.path={DATA / 'tldr_sft_sample.jsonl'}",
        "augment.ratio=0.5", "train.validation_fraction=0.1",
    ])
    train, validation = reward_data(cfg)
    sources = train.column("source").to_pylist()
    assert sources.count("feedback") == 8
    n_file = 57 - len(validation.column("source"))  # 57 valid rows in the sample file
    n_human = n_file + 8
    assert sum(s.startswith("synthetic:") for s in sources) == round(0.5 * n_human)
    assert not any(s.startswith("synthetic:") for s in validation.column("source").to_pylist())

"""rlhf.tracking: a run's config, metrics rows and model folder in MLflow and W&B, read back through
each backend's own files and client; a missing package is one line naming the extra. The real job
run with a tracker (an SFT job logging from its rank-0 Ray Train worker) is in
tests/train/test_train.py, where that run also checks the SFT learns."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from rlhf.cli import tracked_run
from rlhf.config.core import ConfigError, load_config, parse_cli
from rlhf.metrics import MetricsWriter
from rlhf.train.config import RewardConfig, SFTConfig

# Rows as the supervised loop writes them: an eval before training, train and eval rows at one step.
ROWS: list[dict[str, Any]] = [
    {"event": "eval", "step": 0, "val_loss": 2.5, "accuracy": 0.5},
    {"event": "train", "step": 2, "loss": 2.25, "lr": 1e-3, "samples_per_s": 40.0},
    {"event": "eval", "step": 2, "val_loss": 2.0, "accuracy": 0.75},
    {"event": "train", "step": 4, "loss": 1.5, "lr": 5e-4, "samples_per_s": 41.5},
]
SECRET_URL = "postgresql+psycopg://rlhf:hunter2@db.example/rlhf"
REDACTED_URL = "postgresql+psycopg://rlhf:***@db.example/rlhf"  # as config.yaml saves it


def _config(tmp_path: Path, backends: str) -> RewardConfig:
    return load_config(RewardConfig, None, [f"output_dir={tmp_path}", f"tracking.backends={backends}",
                                            "tracking.run_name=unit", f"store.url={SECRET_URL}"])


def _log_run(cfg: RewardConfig, model: Path) -> None:
    """What a training job does with its trackers: rows as they are written, then the model."""
    with MetricsWriter(cfg.output_dir, "step", tracked_run(cfg).open(cfg.output_dir)) as writer:
        for row in ROWS:
            writer.write(row)
        writer.log_artifact(model)


def _model_folder(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "t5"}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    return model


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in rows if key in row]


def test_mlflow_run_holds_the_config_every_metrics_row_and_the_model(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _config(tmp_path, "[tensorboard,mlflow]")
    _log_run(cfg, _model_folder(tmp_path))

    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == ROWS
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # the default: a local store in output_dir
    experiment = client.get_experiment_by_name("rlhf")
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("unit", "FINISHED")
    for key in ("val_loss", "accuracy", "loss", "lr", "samples_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == _series(written, key), key
    params = run.data.params
    assert params["train.lr"] == str(cfg.train.lr)
    assert params["tracking.backends"] == "['tensorboard', 'mlflow']"
    assert params["heads.layout"] == "single" and params["data.path"] == cfg.data.path
    assert params["store.url"] == REDACTED_URL
    assert "hunter2" not in json.dumps(params)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/config.json", "model/model.safetensors"}
    assert (tmp_path / "mlartifacts").is_dir()  # the files beside the database
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard beside it


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B transaction log (``run-<id>.wandb``): a LevelDB-style log of protobuf
    ``Record`` messages, 32 KiB blocks of chunks (crc32, length, type; FULL=1, FIRST, MIDDLE, LAST=4)
    after a 7-byte header. ``wandb sync`` uploads exactly these records."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # a block's tail too short for a chunk header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def _item(item: Any) -> tuple[str, Any]:
    return item.key or ".".join(item.nested_key), json.loads(item.value_json)


def _wandb_run(run_folder: Path) -> dict[str, Any]:
    """What an offline run recorded, as ``wandb sync`` would upload it: history rows by step, the
    summary (its updates applied in order), the config, the artifacts. Offline, W&B writes no
    files/wandb-summary.json or files/config.yaml: those are made when the run is synced."""
    (log,) = run_folder.glob("run-*.wandb")
    run: dict[str, Any] = {"history": {}, "summary": {}, "config": {}, "artifacts": []}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = dict(map(_item, record.history.item))
            run["history"][row["_step"]] = row
        elif kind == "summary":
            run["summary"].update(map(_item, record.summary.update))
        elif kind == "config":
            run["config"].update(map(_item, record.config.update))
        elif kind == "artifact":
            run["artifacts"].append(record.artifact)
    return run


def test_wandb_offline_run_holds_the_config_every_metrics_row_and_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # artifact staging, settings
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = _config(tmp_path, "[wandb]")
    _log_run(cfg, _model_folder(tmp_path))

    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")  # offline: nothing left the machine
    run = _wandb_run(run_folder)
    for row in ROWS:
        for key, value in row.items():
            if key not in ("event", "step"):
                assert math.isclose(run["history"][row["step"]][key], value), (row, run["history"])
    assert sorted(run["history"]) == [0, 2, 4]  # one row per step: train and eval rows of a step merge
    last = {"loss": 1.5, "val_loss": 2.0, "accuracy": 0.75, "_step": 4}
    assert {key: run["summary"][key] for key in last} == last
    config = run["config"]
    assert config["train.lr"] == cfg.train.lr and config["heads.layout"] == "single"
    assert config["tracking.backends"] == ["wandb"] and config["store.url"] == REDACTED_URL
    (artifact,) = run["artifacts"]
    assert artifact.type == "model" and artifact.name == f"model-{run_folder.name.rsplit('-', 1)[1]}"
    assert {entry.path for entry in artifact.manifest.contents} == {"config.json", "model.safetensors"}


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(
        backend: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed: importing it fails
    with pytest.raises(SystemExit) as exit_:
        parse_cli(SFTConfig, [f"tracking.backends=[tensorboard,{backend}]"], prog="sft.py")
    assert exit_.value.code == 2
    expected = f"tracking.backends: {backend} needs the tracking extra: pip install -e '.[tracking]'"
    assert capsys.readouterr().err == f"sft.py: error: {expected}\n"


def test_tracking_backends_are_checked_like_every_key() -> None:
    with pytest.raises(ConfigError, match=r"tracking.backends\[0\]: expected one of 'tensorboard', 'wandb'"):
        load_config(SFTConfig, None, ["tracking.backends=[neptune]"])
    with pytest.raises(ConfigError, match="tracking.backends: mlflow is listed twice"):
        load_config(SFTConfig, None, ["tracking.backends=[mlflow,mlflow]"])
    with pytest.raises(ConfigError, match="tracking.wandb_mode: expected one of 'offline', 'online'"):
        load_config(SFTConfig, None, ["tracking.wandb_mode=cloud"])

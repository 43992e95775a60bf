"""Rollback: the registry's CURRENT pointer, POST /admin/rollback on a running Serve app with two
policy replicas under a stream of requests, and the online loop continuing from the rolled-back
version."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from support.online import label_choices, online_config
from support.serve import publish_tiny, serve_config, start_with_admin, summarize_stream, wait_for_answers

from rlhf.online.loop import OnlineLoop
from rlhf.registry import CURRENT_FILE, PolicyRegistry, UnknownVersionError
from rlhf.store import FeedbackStore

ADMIN_TOKEN = "test-admin-token-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TEXT = "The city council voted on Tuesday to extend the bike lane network across the river."


def test_current_is_the_newest_until_a_rollback_and_a_publish_moves_it_again(tmp_path: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    assert registry.current() is None
    publish_tiny(registry.root, seed=1)
    publish_tiny(registry.root, seed=2)
    assert registry.current().name == "v0002"
    assert registry.set_current("v0001") == registry.root / "v0001"
    assert registry.current().name == "v0001" and registry.latest().name == "v0002"
    assert (registry.root / CURRENT_FILE).read_text() == "v0001\n"
    with pytest.raises(UnknownVersionError, match=r"version: 'v0009' is not in the registry; "
                                                  r"published versions: v0001, v0002"):
        registry.set_current("v0009")
    assert registry.current().name == "v0001"
    assert publish_tiny(registry.root, seed=3).name == "v0003" and registry.current().name == "v0003"
    (registry.root / CURRENT_FILE).write_text("v0002-deleted\n")  # a pointer to no version: newest
    assert registry.current().name == "v0003"
    assert sorted(p.name for p in registry.root.iterdir()) == ["CURRENT", "v0001", "v0002", "v0003"]


def test_a_relative_registry_hands_out_absolute_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Ray workers run in another folder: the online loop's second reward update once failed on
    ``runs/.../reward_registry/v0001`` read there as a hub name."""
    monkeypatch.chdir(tmp_path)
    publish_tiny(Path("runs/registry"), seed=1)
    current = PolicyRegistry("runs/registry").current()
    assert current == tmp_path / "runs" / "registry" / "v0001" and current.is_absolute()


@dataclass
class App:
    url: str
    registry: PolicyRegistry


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    from ray import serve

    root = tmp_path_factory.mktemp("rollback")
    registry = root / "registry"
    for seed in (1, 2, 3):
        publish_tiny(registry, seed=seed)
    cfg = serve_config(registry, root / "feedback.db", "serve.replicas=2", "serve.cpus_per_replica=0.5",
                       "serve.reload_interval_s=0.5")
    url = start_with_admin(cfg, ADMIN_TOKEN)
    yield App(url, PolicyRegistry(registry))
    serve.shutdown()


def _rollback_during_requests(app: App, version: str) -> tuple[list[str], list[str]]:
    """The versions that answered 4 clients' stream of /v1/summarize before the rollback to
    ``version`` returned, and after it; the stream runs until 12 answers in a row came from
    ``version`` (every replica has followed; 60 s at most) and 12 more; fails if any request failed."""
    with summarize_stream(app.url, TEXT) as answers:
        wait_for_answers(answers, 4)
        rolled = requests.post(f"{app.url}/admin/rollback", json={"version": version}, headers=AUTH,
                               timeout=60)
        assert rolled.status_code == 200 and rolled.json()["version"] == version, rolled.text
        switched = len(answers)
        deadline = time.monotonic() + 60
        while len(answers) < switched + 12 or set(answers[-12:]) != {version}:
            assert time.monotonic() < deadline, f"not every replica answers with {version}: {answers[-12:]}"
            time.sleep(0.1)
        settled = len(answers)
        while len(answers) < settled + 12:
            time.sleep(0.1)
    return answers[:switched], answers[settled:]


def test_a_rollback_under_load_fails_no_request_and_every_replica_follows(app: App) -> None:
    before, after = _rollback_during_requests(app, "v0001")
    assert before and before[0] == "v0003" and set(before) <= {"v0003", "v0001"}
    assert set(after) == {"v0001"}  # no replica went back to the newest version
    for _ in range(8):  # /v1/policy, answered by either replica, reports the rolled-back version
        info = requests.get(app.url + "/v1/policy", timeout=60).json()
        assert info["version"] == "v0001" and info["versions"] == ["v0001", "v0002", "v0003"]
    assert app.registry.current().name == "v0001"


def test_rollback_needs_the_admin_token_and_a_published_version(app: App) -> None:
    current = app.registry.current()
    unknown = requests.post(app.url + "/admin/rollback", json={"version": "v0042"}, headers=AUTH, timeout=60)
    assert unknown.status_code == 404 and "'v0042' is not in the registry" in unknown.json()["detail"]
    anonymous = requests.post(app.url + "/admin/rollback", json={"version": "v0002"}, timeout=60)
    assert anonymous.status_code == 401
    empty = requests.post(app.url + "/admin/rollback", json={"version": ""}, headers=AUTH, timeout=60)
    assert empty.status_code == 422 and "version" in str(empty.json()["detail"])
    assert app.registry.current() == current


def test_the_online_loop_continues_from_the_rolled_back_version(app: App, tmp_path: Path) -> None:
    app.registry.set_current("v0002")
    cfg = online_config(tmp_path, f"registry={app.registry.root}")
    store = FeedbackStore(cfg.store.url)
    label_choices(store, 16)
    loop = OnlineLoop(cfg)
    assert loop.context.current_policy() == str(app.registry.root / "v0002")
    cycle = loop.start_cycle(None)  # fixes the next cycle's window and what it starts from
    assert cycle.record.policy_before == str(app.registry.root / "v0002")
    assert loop.ledger.all()[0].record.policy_before.endswith("v0002")
    store.close()

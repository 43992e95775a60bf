"""Active pair selection: the margin rule on hand-computed values, its config, and a real Serve app
with ``pair_selection=uncertain`` storing the candidate pair its reward model is least sure about."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from support.serve import publish_tiny, serve_config, start_with_admin

from rlhf.config.core import ConfigError, load_config, parse_cli
from rlhf.config.sections import ModelConfig
from rlhf.models import load_reward_model
from rlhf.registry import PolicyRegistry
from rlhf.serve.config import ServeConfig
from rlhf.serve.selection import least_certain, preference_margin
from rlhf.store import FeedbackStore

ADMIN = {"Authorization": "Bearer selection-admin-token-0123456789abcdef"}
TEXT = "The council voted to close the old bridge to lorries after engineers found cracks in two piers."
CANDIDATES = 3


def test_preference_margin_matches_hand_computed_values():
    assert preference_margin(0.0, 0.0) == 0.0  # σ(0) = 1/2
    assert preference_margin(math.log(3), 0.0) == pytest.approx(0.25)  # σ(ln 3) = 3/4
    assert preference_margin(1.0, 1.0 + math.log(3)) == pytest.approx(0.25)  # σ(-ln 3) = 1/4
    assert preference_margin(2.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)) - 0.5)  # 0.2311
    assert preference_margin(800.0, -800.0) == 0.5  # no overflow for a huge gap


def test_least_certain_takes_the_smallest_margin_and_the_first_on_a_tie():
    # |r_0 - r_1| = ln 3, 0.5, 0.2, 5: the third pair is the closest call.
    assert least_certain([(math.log(3), 0.0), (0.5, 1.0), (2.0, 2.2), (5.0, 0.0)]) == 2
    assert least_certain([(1.0, 0.0), (0.0, 1.0), (3.0, 3.5)]) == 2
    assert least_certain([(1.0, 0.0), (0.0, 1.0)]) == 0  # the same margin either way round
    with pytest.raises(ValueError, match="at least one"):
        least_certain([])


def test_uncertain_without_a_reward_registry_is_a_config_error(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(ConfigError) as error:
        load_config(ServeConfig, None, ["serve.pair_selection=uncertain"])
    assert error.value.key == "serve.reward_registry"
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(ServeConfig, ["serve.pair_selection=uncertain"], prog="serve.py")
    assert exit_info.value.code == 2
    assert "serve.reward_registry: pair_selection=uncertain needs a reward model" in capsys.readouterr().err
    assert load_config(ServeConfig, None, []).serve.pair_selection == "random"


def _publish_reward(registry: Path, lengths: ModelConfig, seed: int) -> Path:
    """A tiny-gpt2 reward model whose head is drawn from ``seed``, as the registry's next version."""
    model = load_reward_model(ModelConfig(**{**vars(lengths), "name_or_path": "tiny-gpt2"}))
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return PolicyRegistry(registry).publish(model.save, {"seed": seed})


@dataclass
class App:
    url: str
    store: FeedbackStore
    rewards: Path
    lengths: ModelConfig

    def compare(self, **body) -> dict:
        answer = requests.post(self.url + "/v1/compare", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def selections(self) -> list[dict]:
        answer = requests.get(self.url + "/admin/selections", headers=ADMIN, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """Two tiny policy versions, one tiny reward model, pair_selection=uncertain with 3 candidates."""
    from ray import serve

    root = tmp_path_factory.mktemp("selection")
    publish_tiny(root / "registry", seed=1)
    publish_tiny(root / "registry", seed=2)
    cfg = serve_config(root / "registry", root / "feedback.db", "serve.pair_selection=uncertain",
                       f"serve.pair_candidates={CANDIDATES}", f"serve.reward_registry={root / 'rewards'}")
    _publish_reward(root / "rewards", cfg.policy, seed=1)
    url = start_with_admin(cfg, ADMIN["Authorization"].removeprefix("Bearer "))
    store = FeedbackStore(cfg.store.url)
    yield App(url, store, root / "rewards", cfg.policy)
    store.close()
    serve.shutdown()


def _check_selection(app: App, selection: dict) -> None:
    """The reported scores are the reward model's, and the stored pair has the smallest margin."""
    folder = app.rewards / selection["reward_version"]
    cfg = ModelConfig(**{**vars(app.lengths), "name_or_path": str(folder)})
    model = load_reward_model(cfg, dropout=False)
    pairs = selection["pairs"]
    assert len(pairs) == CANDIDATES
    summaries = [summary for pair in pairs for summary in pair]
    scores = model.score([TEXT] * len(summaries), summaries).view(-1, 2)  # (k, 2)
    reported = torch.tensor(selection["scores"])  # (k, 2)
    assert torch.allclose(scores, reported, atol=1e-4)
    margins = (torch.sigmoid(scores[:, 0] - scores[:, 1]) - 0.5).abs()  # (k,)
    assert selection["chosen"] == int(margins.argmin())
    stored = app.store.get_comparison(selection["comparison_id"])
    assert {stored.summary_0, stored.summary_1} == set(pairs[selection["chosen"]])


def test_queue_requests_store_the_least_certain_candidate(app: App):
    app.compare(text=TEXT)  # a text request is stored as asked (no selection) and fills the queue
    assert app.selections() == []
    shown = [app.compare()["comparison_id"] for _ in range(2)]
    selections = app.selections()
    assert [s["comparison_id"] for s in selections] == shown
    assert {s["reward_version"] for s in selections} == {"v0001"}
    for selection in selections:
        _check_selection(app, selection)


def test_a_newly_published_reward_model_scores_the_next_request(app: App):
    _publish_reward(app.rewards, app.lengths, seed=2)
    app.compare(text=TEXT)
    shown = app.compare()["comparison_id"]
    selection = app.selections()[-1]
    assert (selection["comparison_id"], selection["reward_version"]) == (shown, "v0002")
    _check_selection(app, selection)

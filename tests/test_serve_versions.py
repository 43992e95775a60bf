"""PolicyVersions without Serve: which version is current, which pair a comparison shows, and how a
batch of mixed requests is generated."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from serve_helpers import publish_tiny, serve_config

from rlhf.serve.versions import BASE_VERSION, PolicyVersions, SummaryRequest

TEXTS = ["The river flooded the old mill.", "Prices rose for the third month in a row, the report says."]


def _versions(tmp_path: Path, *overrides: str) -> PolicyVersions:
    cfg = serve_config(tmp_path / "registry", tmp_path / "feedback.db", *overrides)
    return PolicyVersions(cfg.registry, cfg.policy, cfg.serve, torch.device("cpu"), cache_size=2)


def test_an_empty_registry_serves_the_base_policy_then_switches_to_a_published_one(tmp_path: Path):
    versions = _versions(tmp_path)
    assert versions.current == BASE_VERSION and versions.known() == [BASE_VERSION]
    assert versions.refresh() is False
    publish_tiny(tmp_path / "registry", seed=1)
    assert versions.refresh() is True
    assert versions.current == "v0001" and versions.known() == ["v0001"]
    assert versions.metrics("v0001") == {"iteration": 1, "reward_mean": 1.0}


@pytest.mark.parametrize("strategy", ["previous", "random_earlier", "samples"])
def test_the_comparison_pair_follows_the_strategy(tmp_path: Path, strategy: str):
    for seed in (1, 2, 3):
        publish_tiny(tmp_path / "registry", seed)
    versions = _versions(tmp_path, f"serve.compare_strategy={strategy}")
    pairs = {versions.comparison_pair(random.Random(seed)) for seed in range(20)}
    expected = {
        "previous": {("v0003", "v0002")},
        "random_earlier": {("v0003", "v0002"), ("v0003", "v0001")},
        "samples": {("v0003", "v0003")},
    }[strategy]
    assert pairs == expected


def test_a_single_version_is_compared_with_its_own_samples(tmp_path: Path):
    publish_tiny(tmp_path / "registry", seed=1)
    assert _versions(tmp_path).comparison_pair(random.Random(0)) == ("v0001", "v0001")


def test_a_mixed_batch_matches_one_request_at_a_time(tmp_path: Path):
    for seed in (1, 2):
        publish_tiny(tmp_path / "registry", seed)
    versions = _versions(tmp_path)
    batch = [SummaryRequest(text, version, False, tokens)
             for text in TEXTS for version in ("v0002", "v0001") for tokens in (6, 10)]
    together = versions.generate(batch)
    alone = [versions.generate([request])[0] for request in batch]
    assert together == alone
    assert [s.version for s in together] == [r.version for r in batch]
    assert len({s.text for s in together}) > 1  # different versions/lengths write different text


def test_the_cache_keeps_the_current_version_and_drops_the_least_recent(tmp_path: Path):
    for seed in (1, 2, 3):
        publish_tiny(tmp_path / "registry", seed)
    versions = _versions(tmp_path)  # cache_size=2, current v0003
    first = versions.get("v0001")
    versions.get("v0002")  # evicts v0001, never the current v0003
    assert set(versions._loaded) == {"v0003", "v0002"}
    assert versions.get("v0001") is not first  # reloaded from the registry
    with pytest.raises(KeyError):
        versions.get("v0009")


def test_versions_loaded_from_several_threads_at_once_all_load(tmp_path: Path):
    """The reload thread and request threads may ask for uncached versions together."""
    for seed in (1, 2, 3):
        publish_tiny(tmp_path / "registry", seed)
    cfg = serve_config(tmp_path / "registry", tmp_path / "feedback.db")
    versions = PolicyVersions(cfg.registry, cfg.policy, cfg.serve, torch.device("cpu"), cache_size=3)
    with ThreadPoolExecutor(4) as pool:
        policies = list(pool.map(versions.get, ["v0001", "v0002", "v0001", "v0002"]))
    for policy in policies:
        assert all(not p.is_meta for p in policy.model.parameters())
    assert policies[0] is policies[2] and policies[1] is policies[3]  # each version loaded once

"""PolicyVersions without Serve: which version is current, which pair a comparison shows, how a
batch of mixed requests is generated, and adapter versions sharing one base."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from support.serve import PRESET, publish_tiny, publish_tiny_adapter, serve_config

from rlhf.config.sections import ModelConfig
from rlhf.errors import InputError
from rlhf.models import build_tiny_lm, load_policy
from rlhf.serve.policy_versions import PolicyVersions
from rlhf.serve.records import BASE_VERSION, SummaryRequest

TEXTS = ["The river flooded the old mill.", "Prices rose for the third month in a row, the report says."]


def _versions(tmp_path: Path, *overrides: str, cache_size: int = 2) -> PolicyVersions:
    cfg = serve_config(tmp_path / "registry", tmp_path / "feedback.db", *overrides)
    return PolicyVersions(cfg.registry, cfg.policy, cfg.serve, torch.device("cpu"), cache_size=cache_size)


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


@pytest.mark.parametrize(("rolled_back_to", "expected"), [("v0002", ("v0002", "v0001")),
                                                         ("v0001", ("v0001", "v0001"))])
def test_after_a_rollback_the_pair_never_shows_a_version_rolled_back_from(
    tmp_path: Path, rolled_back_to: str, expected: tuple[str, str]
):
    for seed in (1, 2, 3):
        publish_tiny(tmp_path / "registry", seed)
    versions = _versions(tmp_path, "serve.compare_strategy=random_earlier")
    versions.registry.set_current(rolled_back_to)
    assert versions.refresh() is True
    assert {versions.comparison_pair(random.Random(seed)) for seed in range(20)} == {expected}


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
    # one batch of 8 in four calls of 2 (version x length), then 8 batches of one row each
    assert versions.batch_sizes.requests == {8: 1, 1: 8}
    assert versions.batch_sizes.rows == {2: 4, 1: 8}
    assert versions.batch_sizes.mean_rows() == pytest.approx(16 / 12)
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
    versions = _versions(tmp_path, cache_size=3)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(versions.get, ["v0001", "v0002", "v0001", "v0002"]))
    for version in loaded:
        assert all(not p.is_meta for p in version.policy.model.parameters())
    assert loaded[0] is loaded[2] and loaded[1] is loaded[3]  # each version loaded once


def _base_tensors(models: list[torch.nn.Module]) -> set[int]:
    """Storage of the non-adapter weights of ``models``: one model's worth when they share a base."""
    return {p.data_ptr() for m in models for n, p in m.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-gpt2", "tiny-led"])
def test_adapter_versions_share_one_base_and_a_mixed_batch_is_one_call_equal_to_each_alone(
    tmp_path: Path, preset: str
):
    """T5 and LED: adapters on a published full version (v0001). GPT-2: adapters on the configured
    policy, a tiny preset, served as the base version. LED cannot mix adapters in one call
    (``SEQUENCE_FIRST``): it makes one call per version, still on one base."""
    registry = tmp_path / "registry"
    if preset == "tiny-gpt2":
        base_name, overrides = preset, [f"policy.name_or_path={preset}"]
    else:
        base_name, overrides = publish_tiny(registry, 1, preset), []
    adapters = [publish_tiny_adapter(registry, base_name, seed).name for seed in (2, 3)]
    names = [BASE_VERSION if preset == "tiny-gpt2" else "v0001", *adapters]
    versions = _versions(tmp_path, *overrides, cache_size=3)
    loaded = [versions.get(v) for v in names]
    model = loaded[0].policy.model
    assert all(v.policy.model is model for v in loaded) and set(model.peft_config) == set(adapters)
    # Each version alone, as a plain model: load_policy folds an adapter into its base.
    alone = {v: load_policy(ModelConfig(**{**vars(versions.base), "name_or_path": str(registry / v)}))
             for v in adapters}
    alone[names[0]] = load_policy(ModelConfig(**{**vars(versions.base), "name_or_path": str(base_name)}))
    one_model = len(list(alone[names[0]].model.parameters()))
    assert len(_base_tensors([v.policy.model for v in loaded])) == one_model

    calls: list[list[str]] = []
    generate = model.generate
    model.generate = lambda *args, **kw: calls.append(kw.get("adapter_names")) or generate(*args, **kw)
    batch = [SummaryRequest(text, version, False, 8) for text in TEXTS for version in reversed(names)]
    together = [s.text for s in versions.generate(batch)]
    per_row = [r.version if r.version in adapters else "__base__" for r in batch]
    assert calls == ([None] * 3 if preset == "tiny-led" else [per_row])
    assert together == [alone[r.version].generate([r.text], max_new_tokens=8, do_sample=False)[0]
                        for r in batch]
    by_version = {v: tuple(text for text, r in zip(together, batch) if r.version == v) for v in names}
    assert len(set(by_version.values())) == 3  # the adapters change the text
    assert versions.get(adapters[0]).policy.model is model  # nothing was reloaded


def test_evicting_an_adapter_version_removes_its_adapter_and_keeps_the_base(tmp_path: Path):
    registry = tmp_path / "registry"
    base = publish_tiny(registry, seed=1)
    publish_tiny_adapter(registry, base, seed=2)  # v0002 on v0001
    publish_tiny(registry, seed=3)  # v0003: current, another model
    versions = _versions(tmp_path)  # cache_size=2
    weights = _base_tensors([versions.get("v0002").policy.model])
    assert versions.get("v0002").policy.adapted
    full = versions.get("v0001")  # evicts v0002: its adapter goes, the base (v0001) stays
    assert set(versions._loaded) == {"v0003", "v0001"}
    assert not full.policy.adapted and _base_tensors([full.policy.model]) == weights
    summary = versions.generate([SummaryRequest(TEXTS[0], "v0001", False, 8)])[0]
    assert versions.get("v0002").policy.adapted  # evicts v0001, whose base v0002 still uses
    assert _base_tensors([versions.get("v0002").policy.model]) == weights
    # now as "__base__" rows of the adapted model
    assert versions.generate([SummaryRequest(TEXTS[0], "v0001", False, 8)])[0] == summary


def test_an_adapter_whose_base_changed_is_refused_naming_the_folder_and_the_fix(tmp_path: Path):
    base = publish_tiny(tmp_path / "bases", seed=1)
    adapter = publish_tiny_adapter(tmp_path / "registry", base, seed=2)
    build_tiny_lm(PRESET, seed=5).save_pretrained(str(base))  # the base is retrained after the adapter
    expected = rf"^{adapter}: its base {base} changed since the adapter was saved .*base_model_name_or_path"
    with pytest.raises(InputError, match=expected):
        _versions(tmp_path)  # serving v0001 loads it
    with pytest.raises(InputError, match=expected):
        load_policy(ModelConfig(name_or_path=str(adapter)))


def test_a_summary_never_carries_nul_and_a_request_past_the_models_positions_is_cut(tmp_path: Path):
    """A byte-level policy that may only write NUL or "a": what it serves has no NUL (no database
    stores it as text); a causal policy asked for more tokens than its positions leave writes what
    fits instead of failing its batch."""
    from rlhf.models import load_tokenizer
    from rlhf.models.policy import Policy
    from rlhf.registry import PolicyRegistry

    model, tokenizer = build_tiny_lm("tiny-gpt2", seed=3), load_tokenizer("tiny-gpt2")
    allowed = {tokenizer.convert_tokens_to_ids("\x00"), tokenizer.convert_tokens_to_ids("a")}
    model.generation_config.suppress_tokens = [i for i in range(model.config.vocab_size) if i not in allowed]
    PolicyRegistry(tmp_path / "registry").publish(Policy(model, tokenizer, 480, 32).save, {})
    versions = _versions(tmp_path, "policy.name_or_path=tiny-gpt2", "policy.max_source_length=480")
    long_text = " ".join(["word"] * 600)
    summaries = versions.generate([SummaryRequest(TEXTS[0], "v0001", True, 24),
                                   SummaryRequest(long_text, "v0001", False, 1000)])
    assert all(isinstance(s.text, str) and "\x00" not in s.text for s in summaries), summaries
    assert summaries[1].truncated and 0 < len(summaries[1].text) <= 32

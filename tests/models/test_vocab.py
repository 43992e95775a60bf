"""A model whose embedding is larger than its tokenizer (GPT-2's 50,257 rows, ByT5's 384 ids) never
samples an id the tokenizer cannot decode, and PPO scores its samples under the same masked
distribution (rlhf.models.vocab)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from support.serve import serve_config
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList

from rlhf.config.sections import ModelConfig
from rlhf.models.policy import Policy
from rlhf.models.scoring import policy_inputs
from rlhf.models.tiny import EOS_ID, PAD_ID
from rlhf.models.vocab import KnownIdsOnly, known_logits, mask_unknown_ids, with_known_ids_only
from rlhf.ppo.experience import generate_rollout, response_logprobs
from rlhf.serve.policy_versions import PolicyVersions
from rlhf.serve.records import BASE_VERSION, SummaryRequest

torch.set_num_threads(1)

MODEL_VOCAB = 50257  # GPT-2's embedding rows
TOKENIZER_VOCAB = 384  # len(ByT5Tokenizer())
UNKNOWN_BOOST = 4.0  # added to the logits of ids >= 384, so an undecodable id is always the largest
DOCUMENTS = ["short", "a much longer document that needs no padding at all", "x", "a medium-sized text"]
MAX_NEW = 8


# --------------------------------------------------------------------------- the pure rule


def test_mask_unknown_ids_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 10.0, -5.0]])
    masked = mask_unknown_ids(logits, 3)
    assert masked[0, :3].tolist() == [1.0, 2.0, 3.0] and masked[0, 3:].tolist() == [-math.inf] * 2
    # log-softmax over the masked row = log-softmax over its first 3 logits: x - log(e^1 + e^2 + e^3)
    norm = math.log(math.e + math.e**2 + math.e**3)
    expected = [1.0 - norm, 2.0 - norm, 3.0 - norm]
    torch.testing.assert_close(torch.log_softmax(masked, -1)[0, :3], torch.tensor(expected))
    assert logits[0, 3] == 10.0  # the input is not modified


def test_mask_unknown_ids_leaves_a_vocabulary_the_tokenizer_covers_alone() -> None:
    logits = torch.randn(2, 3, 384)
    assert mask_unknown_ids(logits, 384) is logits
    assert mask_unknown_ids(logits, 400) is logits  # tokenizer larger than the model: nothing to mask


def test_mask_unknown_ids_passes_no_gradient_to_unknown_ids() -> None:
    logits = torch.randn(2, 6, requires_grad=True)
    torch.log_softmax(mask_unknown_ids(logits, 4), -1)[:, :4].sum().backward()
    assert (logits.grad[:, 4:] == 0).all() and (logits.grad[:, :4] != 0).any()


def test_known_logits_score_like_the_masked_distribution() -> None:
    logits = torch.randn(2, 3, 7)
    kept = known_logits(logits, 5)
    assert kept.shape == (2, 3, 5) and kept.data_ptr() == logits.data_ptr()  # a view, no copy
    masked = torch.log_softmax(mask_unknown_ids(logits, 5), -1)
    torch.testing.assert_close(torch.log_softmax(kept, -1), masked[..., :5])
    assert known_logits(logits, 7) is logits and known_logits(logits, 9) is logits


def test_a_row_whose_largest_logit_is_unknown_never_samples_it() -> None:
    scores = torch.zeros(1, 8)
    scores[0, 6] = 20.0  # an id >= vocab holds almost all the probability
    processed = LogitsProcessorList([KnownIdsOnly(5)])(torch.zeros(1, 1, dtype=torch.long), scores)
    torch.manual_seed(0)
    samples = torch.multinomial(torch.softmax(processed, -1).expand(2000, -1), 1)
    assert samples.max() < 5 and set(samples.flatten().tolist()) == set(range(5))
    assert processed.argmax(-1).item() < 5  # greedy too


class _BoostId(LogitsProcessor):
    """A caller's processor that gives an id a large logit."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.token_id] = 100.0
        return scores


def test_a_callers_processors_run_first_and_cannot_unmask() -> None:
    processors = with_known_ids_only(5, LogitsProcessorList([_BoostId(6)]))
    assert isinstance(processors[-1], KnownIdsOnly) and isinstance(processors[0], _BoostId)
    out = processors(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 8))
    assert out[0, 5:].eq(-math.inf).all()


# --------------------------------------------------------------------------- a padded GPT-2


def _padded_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=MODEL_VOCAB,
                        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=EOS_ID)
    return GPT2LMHeadModel(config).eval()


def _tokenizer() -> ByT5Tokenizer:
    tokenizer = ByT5Tokenizer()
    assert len(tokenizer) == TOKENIZER_VOCAB
    return tokenizer


@pytest.fixture(scope="module")
def policy() -> Policy:
    """Random GPT-2 weights whose largest logit is always an undecodable id (a head hook, seen by
    generation and scoring alike)."""
    model = _padded_gpt2()
    bias = torch.zeros(MODEL_VOCAB)
    bias[TOKENIZER_VOCAB:] = UNKNOWN_BOOST
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    return Policy(model, _tokenizer(), max_source_length=64, max_target_length=MAX_NEW)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollouts_sample_only_decodable_ids_and_score_them_masked(policy: Policy, temperature: float) -> None:
    torch.manual_seed(0)
    rollout = generate_rollout(policy, DOCUMENTS, temperature=temperature, max_new_tokens=MAX_NEW)
    assert rollout.response_ids.max() < TOKENIZER_VOCAB and rollout.response_ids.shape[1] > 0
    assert rollout.summaries == policy.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(policy.model, policy, rollout, temperature, with_entropy=True)
        inputs = policy_inputs(False, rollout, None, PAD_ID)
        raw = policy.model(**inputs, logits_to_keep=rollout.response_ids.shape[1]).logits  # (B, T, V)
    known = torch.log_softmax(raw[..., :TOKENIZER_VOCAB] / temperature, -1)  # (B, T, 384)
    expected = known.gather(2, rollout.response_ids[..., None])[..., 0]  # (B, T)
    on = rollout.mask == 1
    torch.testing.assert_close(logprobs[on], expected[on], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy[on], -(known.exp() * known).sum(-1)[on], atol=1e-5, rtol=0)


def test_rollouts_sample_from_the_masked_softmax_generate_reports(policy: Policy) -> None:
    """generate's per-step scores (after its processors) are the masked logits / temperature."""
    temperature = 0.7
    torch.manual_seed(0)
    rollout = generate_rollout(policy, DOCUMENTS, temperature=temperature, max_new_tokens=MAX_NEW)
    torch.manual_seed(0)
    out = policy.model.generate(
        **rollout.query, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        max_new_tokens=MAX_NEW, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        logits_processor=policy.logits_processors(), output_scores=True, return_dict_in_generate=True,
    )
    sampled = out.sequences[:, rollout.query["input_ids"].shape[1]:]  # (B, T)
    assert torch.equal(sampled, rollout.response_ids[:, : sampled.shape[1]])
    scores = torch.stack(out.scores, 1)  # (B, T, V)
    assert scores[..., TOKENIZER_VOCAB:].eq(-math.inf).all()
    with torch.no_grad():
        logprobs, _ = response_logprobs(policy.model, policy, rollout, temperature)
    expected = torch.log_softmax(scores, -1).gather(2, sampled[..., None])[..., 0]  # (B, T)
    on = rollout.mask[:, : sampled.shape[1]] == 1
    torch.testing.assert_close(logprobs[:, : sampled.shape[1]][on], expected[on], atol=1e-4, rtol=0)


def test_masked_logprobs_are_differentiable(policy: Policy) -> None:
    torch.manual_seed(0)
    rollout = generate_rollout(policy, DOCUMENTS, temperature=0.7, max_new_tokens=MAX_NEW)
    logprobs, entropy = response_logprobs(policy.model, policy, rollout, 0.7, with_entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    grad = policy.model.get_input_embeddings().weight.grad  # tied to the LM head
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    policy.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "top_p": 0.9, "top_k": 5}])
def test_policy_generate_decodes(policy: Policy, sampling: dict) -> None:
    torch.manual_seed(0)
    summaries = policy.generate(DOCUMENTS, **sampling)  # raised ValueError from ByT5's decode before
    assert len(summaries) == len(DOCUMENTS) and all(isinstance(s, str) for s in summaries)


def test_policy_generate_keeps_a_callers_processor(policy: Policy) -> None:
    boost_a = LogitsProcessorList([_BoostId(policy.tokenizer.convert_tokens_to_ids("a"))])
    summaries = policy.generate(DOCUMENTS[:1], do_sample=False, max_new_tokens=3, logits_processor=boost_a)
    assert summaries == ["aaa"]


def test_serve_versions_generate_decodable_summaries(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2-padded"
    _padded_gpt2().save_pretrained(str(folder))
    _tokenizer().save_pretrained(str(folder))
    cfg = serve_config(tmp_path / "registry", tmp_path / "feedback.db")
    base = ModelConfig(name_or_path=str(folder), max_source_length=64, max_target_length=MAX_NEW)
    versions = PolicyVersions(cfg.registry, base, cfg.serve, torch.device("cpu"))
    assert versions.current == BASE_VERSION
    torch.manual_seed(0)
    requests = [SummaryRequest(text, BASE_VERSION, sample, MAX_NEW)
                for text in DOCUMENTS for sample in (False, True)]
    summaries = versions.generate(requests)
    assert [s.version for s in summaries] == [BASE_VERSION] * len(requests)
    assert all(isinstance(s.text, str) for s in summaries)

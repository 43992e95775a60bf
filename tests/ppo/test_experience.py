"""rlhf.ppo.experience on tiny seq2seq and causal presets: sampling, alignment, scoring.

The key tests compare batched scoring (left-padded prompts of different lengths, responses of
different lengths) with a naive computation on one unpadded row at a time, and with the scores
``generate`` itself reports for the tokens it sampled.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from rlhf.config.sections import ModelConfig
from rlhf.models import Policy, ValueModel, load_policy, load_value_model
from rlhf.models.scoring import response_logits
from rlhf.models.tiny import EOS_ID, PAD_ID
from rlhf.ppo.experience import (
    Rollout,
    generate_rollout,
    response_logprobs,
    response_mask,
    response_values,
)

torch.set_num_threads(1)

PRESETS = ["tiny-t5", "tiny-led", "tiny-gpt2", "tiny-llama"]
DOCUMENTS = [
    "short",
    "a much longer document, long enough that its prompt needs no padding at all",
    "a medium-sized text",
    "x",
    "another document of some length",
]
MAX_NEW = 10
# Added to the EOS logit so that a random tiny model ends some responses early (~10% a step):
# the batch then mixes ended rows of different lengths with rows cut at MAX_NEW.
EOS_BOOST = 3.5


def _boost_eos(policy: Policy) -> None:
    """A forward hook on the LM head: generation and scoring both see the same boosted logits."""
    bias = torch.zeros(policy.model.config.vocab_size)
    bias[EOS_ID] = EOS_BOOST
    policy.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)


def _config(name: str) -> ModelConfig:
    return ModelConfig(name_or_path=name, max_source_length=64, max_target_length=MAX_NEW)


@pytest.fixture(scope="module")
def policies() -> Callable[[str], Policy]:
    cache: dict[str, Policy] = {}

    def get(name: str) -> Policy:
        if name not in cache:
            cache[name] = load_policy(_config(name))
            _boost_eos(cache[name])
        return cache[name]

    return get


def _rollout(policy: Policy, seed: int = 0, **kwargs) -> Rollout:
    torch.manual_seed(seed)
    return generate_rollout(policy, DOCUMENTS, max_new_tokens=MAX_NEW, **kwargs)


def _assert_varied(rollout: Rollout) -> None:
    """Precondition of the alignment tests: lengths really differ inside the batch."""
    lengths = rollout.mask.sum(1)
    assert rollout.ended.any() and not rollout.ended.all(), rollout.ended
    assert len(set(lengths.tolist())) > 2, lengths


def _row_parts(rollout: Rollout, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's unpadded prompt / encoder input ids and response ids."""
    prompt = rollout.query["input_ids"][i][rollout.query["attention_mask"][i] == 1]
    response = rollout.response_ids[i][rollout.mask[i] == 1]
    return prompt, response


def _naive_outputs(policy: Policy, forward: Callable[..., torch.Tensor], rollout: Rollout, i: int):
    """``forward``'s per-position outputs predicting row i's response, from that row alone."""
    prompt, response = _row_parts(rollout, i)
    n = len(response)
    if policy.is_encoder_decoder:
        start = torch.tensor([policy.model.config.decoder_start_token_id])
        extra = {}
        if "global_attention_mask" in rollout.query:
            extra["global_attention_mask"] = rollout.query["global_attention_mask"][i, : len(prompt)][None]
        out = forward(
            input_ids=prompt[None], decoder_input_ids=torch.cat([start, response[:-1]])[None], **extra
        )
        return out[0, :n]
    ids = torch.cat([prompt, response])[None]  # (1, P_i + n)
    out = forward(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt) - 1 : len(prompt) - 1 + n]


# --------------------------------------------------------------------------- generate_rollout


@pytest.mark.parametrize("name", PRESETS)
def test_rollout_mask_ends_at_first_eos(policies, name: str) -> None:
    policy = policies(name)
    rollout = _rollout(policy)
    _assert_varied(rollout)
    batch = len(DOCUMENTS)
    assert rollout.response_ids.shape == rollout.mask.shape == (batch, MAX_NEW)
    assert rollout.mask.dtype == torch.float32 and rollout.ended.shape == (batch,)
    assert rollout.query["input_ids"].device.type == "cpu"
    for ids, mask, ended in zip(rollout.response_ids, rollout.mask, rollout.ended):
        eos = (ids == EOS_ID).nonzero().flatten().tolist()
        length = eos[0] + 1 if eos else MAX_NEW
        assert ended == bool(eos)
        assert mask.tolist() == [1.0] * length + [0.0] * (MAX_NEW - length)
        assert (ids[length:] == PAD_ID).all()
    masked = rollout.response_ids.masked_fill(rollout.mask == 0, PAD_ID)
    assert rollout.summaries == policy.tokenizer.batch_decode(masked, skip_special_tokens=True)


@pytest.mark.parametrize("name", PRESETS)
def test_rollout_without_stopping_has_max_new_tokens(policies, name: str) -> None:
    rollout = _rollout(policies(name), stop_at_eos=False)
    assert rollout.response_ids.shape == (len(DOCUMENTS), MAX_NEW)
    assert (rollout.mask == 1).all()
    assert rollout.ended.tolist() == (rollout.response_ids == EOS_ID).any(1).tolist()
    # EOS was sampled (boosted) early in some row, and sampling went on after it.
    after_eos = (rollout.response_ids == EOS_ID).long().cumsum(1) > 0  # (B, T)
    assert (after_eos & (rollout.response_ids > EOS_ID)).any()


def test_response_mask_counts_from_eos_not_pad() -> None:
    # GPT-2 and Llama tokenizers pad with EOS: a `!= pad` mask would drop the EOS itself.
    ids = torch.tensor([[5, EOS_ID, EOS_ID, EOS_ID], [5, 6, 7, 8], [EOS_ID, 9, 0, 0]])
    expected = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(response_mask(ids, EOS_ID), expected)


def test_min_new_tokens_delays_eos(policies) -> None:
    lengths = _rollout(policies("tiny-gpt2"), min_new_tokens=4).mask.sum(1)
    assert (lengths >= 4).all() and (lengths < MAX_NEW).any()


@pytest.mark.parametrize(
    ("field", "value"),
    [("no_repeat_ngram_size", 1), ("suppress_tokens", [EOS_ID]), ("forced_eos_token_id", EOS_ID),
     ("num_beams", 2)],
)
def test_model_generation_config_cannot_change_sampling(policies, field: str, value) -> None:
    """Hub generation configs ask for beams, bans and forced tokens; PPO samples the plain policy."""
    plain = _rollout(policies("tiny-gpt2"))
    policy = load_policy(_config("tiny-gpt2"))  # same weights, its own generation config
    _boost_eos(policy)
    setattr(policy.model.generation_config, field, value)
    assert torch.equal(_rollout(policy).response_ids, plain.response_ids)


def test_rollout_is_reproducible_with_a_seed(policies) -> None:
    policy = policies("tiny-gpt2")
    first, again, other = _rollout(policy, 1), _rollout(policy, 1), _rollout(policy, 2)
    assert torch.equal(first.response_ids, again.response_ids) and first.summaries == again.summaries
    assert not torch.equal(first.response_ids, other.response_ids)


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("name", [*PRESETS, "tiny-bart"])
def test_logprobs_match_unpadded_rows(policies, name: str) -> None:
    policy = policies(name)
    rollout = _rollout(policy)
    _assert_varied(rollout)
    if not policy.is_encoder_decoder:  # prompts of different lengths are left-padded
        assert len(set(rollout.query["attention_mask"].sum(1).tolist())) > 2
    with torch.no_grad():
        logprobs, entropy = response_logprobs(policy.model, policy, rollout, with_entropy=True)
    assert logprobs.shape == entropy.shape == rollout.mask.shape
    assert (logprobs[rollout.mask == 0] == 0).all()
    for i in range(len(DOCUMENTS)):
        _, response = _row_parts(rollout, i)
        with torch.no_grad():
            logits = _naive_outputs(policy, lambda **kw: policy.model(**kw).logits, rollout, i)
        expected = torch.log_softmax(logits, -1)  # (n, V)
        n = len(response)
        picked = expected.gather(1, response[:, None])[:, 0]  # (n,)
        torch.testing.assert_close(logprobs[i, :n], picked, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy[i, :n], -(expected.exp() * expected).sum(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_logprobs_use_the_temperature(policies, name: str) -> None:
    policy = policies(name)
    rollout = _rollout(policy)
    with torch.no_grad():
        logits = response_logits(policy.model, policy, rollout)  # (B, T, V)
        hot, _ = response_logprobs(policy.model, policy, rollout, temperature=2.0)
        plain, _ = response_logprobs(policy.model, policy, rollout)
    expected = torch.log_softmax(logits / 2.0, -1).gather(2, rollout.response_ids[..., None])[..., 0]
    on = rollout.mask == 1
    torch.testing.assert_close(hot[on], expected[on], atol=1e-5, rtol=0)
    assert not torch.allclose(hot[on], plain[on], atol=1e-3)


@pytest.mark.parametrize("name", [*PRESETS, "tiny-bart"])
def test_logprobs_match_the_scores_generate_sampled_with(policies, name: str) -> None:
    """We score what we sampled: generate's own per-step scores give the same log-probs."""
    policy, temperature = policies(name), 1.2
    rollout = _rollout(policy, temperature=temperature)
    _assert_varied(rollout)  # rows cut at MAX_NEW show that no EOS was forced there
    query = rollout.query
    torch.manual_seed(0)
    out = policy.model.generate(
        **query, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, forced_eos_token_id=None,  # BART forces EOS
        output_scores=True, return_dict_in_generate=True,
    )
    prefix = 1 if policy.is_encoder_decoder else query["input_ids"].shape[1]
    sampled = out.sequences[:, prefix:]  # (B, T)
    assert torch.equal(sampled, rollout.response_ids[:, : sampled.shape[1]])
    scores = torch.log_softmax(torch.stack(out.scores, 1), -1)  # (B, T, V)
    expected = scores.gather(2, sampled[..., None])[..., 0]  # (B, T)
    with torch.no_grad():
        logprobs, _ = response_logprobs(policy.model, policy, rollout, temperature=temperature)
    on = rollout.mask[:, : sampled.shape[1]] == 1
    torch.testing.assert_close(logprobs[:, : sampled.shape[1]][on], expected[on], atol=1e-4, rtol=0)


def test_logprobs_are_differentiable(policies) -> None:
    policy = policies("tiny-gpt2")
    logprobs, _ = response_logprobs(policy.model, policy, _rollout(policy))
    logprobs.sum().backward()
    assert policy.model.get_input_embeddings().weight.grad.abs().sum() > 0
    policy.model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- values


@pytest.fixture(scope="module")
def value_models() -> Callable[[str], ValueModel]:
    cache: dict[str, ValueModel] = {}

    def get(name: str) -> ValueModel:
        if name not in cache:
            cache[name] = load_value_model(_config(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", PRESETS)
def test_values_match_unpadded_rows(policies, value_models, name: str) -> None:
    policy, value_model = policies(name), value_models(name)
    rollout = _rollout(policy)
    _assert_varied(rollout)
    with torch.no_grad():
        values = response_values(value_model, rollout, policy)
    assert values.shape == rollout.mask.shape
    assert (values[rollout.mask == 0] == 0).all()
    for i in range(len(DOCUMENTS)):
        with torch.no_grad():
            expected = _naive_outputs(policy, value_model, rollout, i)
        torch.testing.assert_close(values[i, : len(expected)], expected, atol=1e-5, rtol=0)


def test_value_model_must_share_the_policy_tokenizer_and_kind(policies, value_models) -> None:
    policy = policies("tiny-t5")
    rollout = _rollout(policy)
    with pytest.raises(ValueError, match="kind|is 'decoder'"):
        response_values(value_models("tiny-gpt2"), rollout, policy)
    other = load_value_model(_config("tiny-t5"))
    other.tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="tokenizer"):
        response_values(other, rollout, policy)


# --------------------------------------------------------------------------- Rollout


@pytest.mark.parametrize("name", ["tiny-led", "tiny-gpt2"])
def test_select_keeps_rows_aligned_with_full_batch_tensors(policies, name: str) -> None:
    policy = policies(name)
    rollout = _rollout(policy)
    with torch.no_grad():
        full, _ = response_logprobs(policy.model, policy, rollout)
    for index in (torch.tensor([3, 0]), slice(1, 4), torch.tensor([True, False, True, False, True])):
        part = rollout.select(index)
        rows = torch.arange(len(DOCUMENTS))[index].tolist()
        assert part.documents == [DOCUMENTS[i] for i in rows]
        assert part.summaries == [rollout.summaries[i] for i in rows]
        assert part.response_ids.shape == (len(rows), MAX_NEW)
        assert torch.equal(part.ended, rollout.ended[index])
        with torch.no_grad():
            logprobs, _ = response_logprobs(policy.model, policy, part)
        torch.testing.assert_close(logprobs, full[index], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-bart", "tiny-gpt2"])  # absolute positions: sides matter
def test_concat_repads_parts_of_different_widths(policies, name: str) -> None:
    policy = policies(name)
    torch.manual_seed(0)
    parts = [generate_rollout(policy, DOCUMENTS[:1], max_new_tokens=4), _rollout(policy).select(slice(1, 5))]
    assert parts[0].query["input_ids"].shape[1] != parts[1].query["input_ids"].shape[1]
    joined = Rollout.concat(parts)
    assert joined.documents == DOCUMENTS and joined.response_ids.shape == (len(DOCUMENTS), MAX_NEW)
    assert torch.equal(joined.ended, torch.cat([part.ended for part in parts]))
    with torch.no_grad():
        logprobs, _ = response_logprobs(policy.model, policy, joined)
        for part, rows in zip(parts, (slice(0, 1), slice(1, 5))):
            expected, _ = response_logprobs(policy.model, policy, part)
            width = expected.shape[1]
            torch.testing.assert_close(logprobs[rows, :width], expected, atol=1e-5, rtol=0)
            assert (logprobs[rows, width:] == 0).all()


def test_to_moves_every_tensor(policies) -> None:
    rollout = _rollout(policies("tiny-led"))
    moved = rollout.to("meta")
    tensors = [*moved.query.values(), moved.response_ids, moved.mask, moved.ended]
    assert {tensor.device.type for tensor in tensors} == {"meta"}
    assert moved.documents == rollout.documents and rollout.response_ids.device.type == "cpu"


def _masked_grads(policy: Policy, logprobs: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the masked log-prob sum, left as they were found (no grad on the shared model)."""
    policy.model.zero_grad(set_to_none=True)
    (logprobs * mask).sum().backward()
    grads = [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]
    policy.model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_in_place_temperature_keeps_values_and_gradients(policies, name: str) -> None:
    """``response_logprobs`` divides the logits in place; ``logits / T`` gives the same everything."""
    policy, temperature = policies(name), 0.7
    rollout = _rollout(policy)
    mask = rollout.mask.float()
    logprobs, _ = response_logprobs(policy.model, policy, rollout, temperature=temperature)
    got = _masked_grads(policy, logprobs, mask)
    logits = response_logits(policy.model, policy, rollout) / temperature  # the copying reference
    expected = torch.log_softmax(logits, -1).gather(2, rollout.response_ids[..., None])[..., 0]
    want = _masked_grads(policy, expected, mask)
    on = rollout.mask == 1
    torch.testing.assert_close(logprobs[on].detach(), expected[on].detach(), atol=1e-5, rtol=0)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_entropy_without_grad_reports_the_same_entropy(policies) -> None:
    """``entropy_grad=False`` (entropy_coef 0): same numbers, no graph, log-probs still differentiable."""
    policy = policies("tiny-gpt2")
    rollout = _rollout(policy)
    logprobs, entropy = response_logprobs(
        policy.model, policy, rollout, with_entropy=True, entropy_grad=False
    )
    _, with_grad = response_logprobs(policy.model, policy, rollout, with_entropy=True)
    assert logprobs.requires_grad and with_grad.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(entropy, with_grad.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("name", PRESETS)
def test_repeated_documents_read_once_sample_the_same_tokens(policies, name: str) -> None:
    """k samples per document share one prompt pass (KV cache or encoder states) and draw what
    reading every row's prompt draws, under one seed."""
    policy, rows = policies(name), [document for document in DOCUMENTS[:3] for _ in range(3)]
    rollouts = []
    for share in (True, False):
        torch.manual_seed(0)
        rollouts.append(generate_rollout(policy, rows, max_new_tokens=MAX_NEW, share_prompts=share))
    shared, plain = rollouts
    assert torch.equal(shared.response_ids, plain.response_ids)
    assert shared.summaries == plain.summaries
    assert len(set(shared.summaries)) > 3  # the rows of one document were sampled apart

"""rlhf.models.scoring: rows that share a prompt read it once, with the log-probs and gradients of
a plain pass (GRPO's k samples per document, DPO's chosen and rejected)."""

from __future__ import annotations

import pytest
import torch

from rlhf.config.sections import ModelConfig
from rlhf.models import load_policy
from rlhf.models.scoring import prompt_groups, response_logprobs
from rlhf.ppo.experience import Rollout, generate_rollout

torch.set_num_threads(1)

PRESETS = ["tiny-t5", "tiny-led", "tiny-gpt2", "tiny-llama"]
# Prompts of different lengths (left padding for causal models), each sampled three times, then
# shuffled so that groups are not consecutive rows.
DOCUMENTS = ["short", "a much longer document that needs no padding", "a medium text"]
ORDER = torch.tensor([4, 0, 7, 2, 8, 1, 5, 3, 6])


def _rollout(name: str, max_new: int = 8) -> tuple[object, Rollout]:
    policy = load_policy(ModelConfig(name_or_path=name, max_source_length=32, max_target_length=max_new),
                         dropout=False)
    torch.manual_seed(0)
    rows = [document for document in DOCUMENTS for _ in range(3)]
    rollout = generate_rollout(policy, rows, max_new_tokens=max_new).select(ORDER)
    # responses of different lengths, as if they had ended (the mask is what scoring reads)
    lengths = torch.arange(len(rows)) % max_new + 1  # (B,)
    rollout.mask = (torch.arange(max_new)[None, :] < lengths[:, None]).float()  # (B, T)
    return policy, rollout


def test_groups_are_rows_with_equal_inputs() -> None:
    query = {"input_ids": torch.tensor([[0, 5], [3, 4], [0, 5], [3, 4], [9, 9]]),
             "attention_mask": torch.tensor([[0, 1], [1, 1], [0, 1], [1, 1], [1, 1]])}
    groups = prompt_groups(query)
    assert groups.shared
    assert groups.of_row.tolist()[0] == groups.of_row.tolist()[2]
    assert groups.of_row.tolist()[1] == groups.of_row.tolist()[3]
    assert len(set(groups.of_row.tolist())) == 3
    assert sorted(groups.first.tolist()) == [0, 1, 4]  # the first row of each group
    assert sorted(groups.of_row[groups.first].tolist()) == [0, 1, 2]  # one first row per group
    # a row equal in ids but not in mask is a prompt of its own
    query["attention_mask"][2, 0] = 1
    assert len(prompt_groups(query).first) == 4
    assert not prompt_groups({"input_ids": torch.tensor([[1], [2]])}).shared


@pytest.mark.parametrize("name", PRESETS)
def test_shared_prompts_give_the_plain_log_probs_and_gradients(name: str) -> None:
    policy, rollout = _rollout(name)

    def pass_(share: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        policy.model.zero_grad()
        logprobs, entropy = response_logprobs(policy.model, policy, rollout, 0.7, with_entropy=True,
                                              share_prompts=share)
        (logprobs.sum() + entropy.sum()).backward()
        return logprobs.detach(), [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]

    shared, shared_grads = pass_(True)
    plain, plain_grads = pass_(False)
    assert shared.shape == plain.shape == rollout.mask.shape
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert len(shared_grads) == len(plain_grads) > 0
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_one_token_responses_share_prompts_too(name: str) -> None:
    policy, rollout = _rollout(name, max_new=1)
    with torch.no_grad():
        shared, _ = response_logprobs(policy.model, policy, rollout)
        plain, _ = response_logprobs(policy.model, policy, rollout, share_prompts=False)
    assert shared.shape == (9, 1)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)

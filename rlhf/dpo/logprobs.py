"""log pi(summary | document) of given summaries, for the DPO loss, its reference and its eval.

The summary tokens are exactly those SFT trains on (``Policy.encode_pairs``' labels: the summary
cut to ``max_target_length``, then EOS), and they are scored by ``rlhf.ppo.experience``'s
``response_logprobs``, the per-token log-probs PPO's roles compute, so seq2seq and causal
policies, the reference and the implicit-reward eval all read a summary the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf.config.sections import ModelConfig
from rlhf.models import IGNORE_INDEX, Policy, load_policy
from rlhf.models.encoding import pad_rows
from rlhf.ppo.experience import Rollout, response_logprobs
from rlhf.ppo.functional import sequence_logprobs
from rlhf.train.loop import Rows
from rlhf.train.reward import chosen_and_rejected


def summary_rollout(policy: Policy, documents: list[str], summaries: list[str]) -> Rollout:
    """The given summaries as a rollout of ``policy``'s response tokens (right-padded, mask 1.0 on
    every summary token and its EOS), with the policy's own generation inputs as the query."""
    labels = policy.encode_pairs(documents, summaries)["labels"]  # (B, L)
    answers = [row[row != IGNORE_INDEX].tolist() for row in labels]
    pad, eos = policy.tokenizer.pad_token_id, policy.tokenizer.eos_token_id
    return Rollout(
        documents=list(documents),
        summaries=list(summaries),
        query=dict(policy.encode_documents(documents)),
        response_ids=pad_rows(answers, pad),  # (B, T)
        mask=pad_rows([[1] * len(answer) for answer in answers], 0).float(),  # (B, T)
        ended=torch.tensor([bool(answer) and answer[-1] == eos for answer in answers]),  # (B,)
        pad_token_id=pad,
        query_padding_side="right" if policy.is_encoder_decoder else "left",
    )


def summary_logprobs(
    model: nn.Module, policy: Policy, documents: list[str], summaries: list[str]
) -> torch.Tensor:
    """(B,) sequence log-probs of ``summaries`` under ``model`` (``policy.model`` or its DeepSpeed
    engine); differentiable, on the model's device."""
    rollout = summary_rollout(policy, documents, summaries)
    logprobs, _ = response_logprobs(model, policy, rollout)  # (B, T)
    return sequence_logprobs(logprobs, rollout.mask.to(logprobs.device))


def pair_logprobs(model: nn.Module, policy: Policy, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs (B,) each of preference rows, in one pass of 2B."""
    documents, chosen, rejected = chosen_and_rejected(rows)
    logprobs = summary_logprobs(model, policy, documents + documents, chosen + rejected)  # (2B,)
    return logprobs[: len(documents)], logprobs[len(documents):]


def load_frozen_policy(cfg: ModelConfig, dtype: torch.dtype | None = None) -> Policy:
    """A policy that only scores: dropout zeroed, eval mode, no gradients. The DPO reference is a
    fixed target per pair, so it must be deterministic; a cached value computed with dropout would
    be one noisy draw. Also what the implicit-reward eval reads, for the same reason."""
    policy = load_policy(cfg, dtype, dropout=False)
    policy.model.eval().requires_grad_(False)
    return policy

"""log pi(summary | document) of preference pairs, for the DPO loss and its reference.

A summary is read by ``rlhf.models.scoring.summary_logprobs``: the tokens SFT trains on, scored
the way PPO's roles score a sampled response, so the policy, the reference and the implicit-reward
eval read a summary the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf.models import Policy
from rlhf.models.scoring import summary_logprobs
from rlhf.train.reward import chosen_and_rejected
from rlhf.train.supervised_loop import Rows


def pair_logprobs(model: nn.Module, policy: Policy, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs (B,) each of preference rows, in one pass of 2B."""
    documents, chosen, rejected = chosen_and_rejected(rows)
    logprobs = summary_logprobs(model, policy, documents + documents, chosen + rejected)  # (2B,)
    return logprobs[: len(documents)], logprobs[len(documents):]

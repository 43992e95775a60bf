"""Token and sequence log-probs from logits: pure tensor functions, no models, no global state.

They sit below both of their users, so each reads a response the same way: PPO (its
``functional`` module exposes them as ``logprobs_from_logits`` / ``entropy_from_logits``, the names
its interface keeps) and the scoring of given
summaries (``rlhf.models.scoring``: DPO, its reference, the implicit-reward eval). Shapes follow
PPO's: ``(B, T)`` right-padded, ``mask`` 1.0 on response tokens and 0.0 on padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _fp32_rowwise(fn: Callable[..., Tensor], logits: Tensor, *rest: Tensor) -> Tensor:
    """Apply ``fn(logits, *rest)``; for half-precision logits, one batch row at a time in fp32.

    log-softmax in bf16/fp16 loses too much precision, but upcasting the whole (B, T, V)
    tensor at once would double its memory; row by row, the extra memory is one (1, T, V)
    fp32 slice. Outputs are fp32 for half-precision input, else logits' dtype.
    """
    if logits.dtype in (torch.float32, torch.float64):
        return fn(logits, *rest)
    rows = [
        fn(logits[i : i + 1].float(), *(r[i : i + 1] for r in rest)) for i in range(logits.shape[0])
    ]
    return torch.cat(rows, dim=0)


def _logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under softmax(logits).

    logits: (B, T, V); labels: (B, T) integer token ids, all valid indices (use the pad id,
    not -100, at padding). Returns (B, T).
    Memory-lean: ``logit[label] - logsumexp(logits)`` never materialises a (B, T, V)
    log-softmax; half-precision logits are processed row by row in fp32 (see
    ``_fp32_rowwise``).
    """
    return _fp32_rowwise(_logprobs, logits, labels)


def _entropy(logits: Tensor) -> Tensor:
    # H = logsumexp(x) - sum(softmax(x) * x). Logits of -inf enter as 0 in the sum (their
    # probability is 0): neither the value nor the gradient meets 0 * -inf = nan.
    finite = torch.where(torch.isfinite(logits), logits, torch.zeros((), dtype=logits.dtype,
                                                                      device=logits.device))
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * finite).sum(dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of the categorical distribution softmax(logits). logits: (B, T, V) -> (B, T).

    Tokens whose logit is -inf (e.g. banned by a logits processor) contribute 0, not nan.
    """
    return _fp32_rowwise(_entropy, logits)


def temper_logits_(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` (same shape) without a second (B, T, V) tensor: ``logits`` itself
    at temperature 1, else ``logits`` divided in place.

    Safe on the differentiable path: the caller owns ``logits`` (a fresh model output, not a
    leaf), dividing by a number saves no tensor for backward, and the linear LM head that made
    ``logits`` needs its inputs, not its output; were a backward to need the overwritten values,
    autograd's version check would raise, never give a wrong gradient.
    """
    if temperature == 1.0:
        return logits
    return logits.div_(temperature)


def sequence_logprobs(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Log-probability of each row's whole response: the masked sum over its tokens.

    token_logprobs, mask: (B, T) -> (B,); an empty row gives 0. A sum, not a mean: DPO's
    implicit reward is the log-ratio of the sequence probabilities. Masked entries are replaced
    (not only multiplied) by zero, so ``inf``/``nan`` there cannot leak into the sum.
    """
    if not token_logprobs.is_floating_point():
        token_logprobs = token_logprobs.float()
    mask = mask.to(dtype=token_logprobs.dtype)
    zero = torch.zeros((), dtype=token_logprobs.dtype, device=token_logprobs.device)
    return torch.where(mask != 0, token_logprobs * mask, zero).sum(dim=-1)

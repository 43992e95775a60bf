"""PPO math as pure tensor functions: no Ray, no models, no global state.

Conventions used by every function here:

* Token tensors are ``(B, T)`` (batch, response length), right-padded.
* ``mask`` is ``(B, T)``, 1.0 on response tokens and 0.0 on padding (bool or integer masks are
  accepted too). Each row's response is a contiguous span ending at its last ``mask == 1``
  index; interior holes (``1, 0, 1``) are not supported.
* Values at ``mask == 0`` positions never affect a result, even if they are ``inf`` or ``nan``:
  masked entries are replaced (not multiplied) by zero before any arithmetic that could spread
  them, so neither the forward value nor the gradients see them.
* Every average over tokens goes through :func:`masked_mean` (a token mean over the whole batch
  unless ``dim`` is given). An all-zero mask gives 0 rather than ``nan``.

The tensor functions never call ``.item()`` or otherwise synchronise with the device, so they
are safe inside a GPU training step (the KL controllers take a Python float once per step).

Advantage estimators, all giving ``(B, T)`` advantages for :func:`policy_loss`:

* PPO: :func:`compute_gae` on :func:`shape_rewards` with a value model, then :func:`masked_whiten`.
* GRPO / RLOO (critic-free, one advantage per sequence): the ``k`` samples of one prompt are
  ``k`` consecutive rows; ``spread_over_tokens(group_advantages(scores, k, kind), mask)`` gives
  every response token of a row its sequence's advantage. The KL penalty, if any, goes into the
  loss, or summed over each row's tokens into its score before grouping (never per token).
* REINFORCE++ (critic-free, per token, as in OpenRLHF): ``reinforce_pp_advantages(
  shape_rewards(group_baseline(scores, k), ...), mask, gamma)``: returns-to-go of the shaped
  rewards (score minus its group mean, plus the per-token KL penalty), whitened over the batch.
  Without groups, pass the raw scores to :func:`shape_rewards`.

How a per-token loss becomes a scalar is decided in one place, :func:`aggregate_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import torch
from torch import Tensor

# The logits functions live below PPO, where the scoring of given summaries (DPO, eval) uses them too.
from rlhf.models.logprobs import temper_logits_, token_entropy, token_logprobs

__all__ = [
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "GroupKind",
    "KLController",
    "KLKind",
    "LossAggregation",
    "aggregate_loss",
    "compute_gae",
    "discounted_returns",
    "entropy_from_logits",
    "explained_variance",
    "group_advantages",
    "group_baseline",
    "kl_penalty",
    "logprobs_from_logits",
    "loss_share",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "reinforce_pp_advantages",
    "shape_rewards",
    "spread_over_tokens",
    "temper_logits_",
    "value_loss",
]


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under softmax(logits): logits (B, T, V), labels (B, T) -> (B, T).

    The implementation is ``rlhf.models.logprobs.token_logprobs``, below both PPO and the scoring
    of given summaries (DPO, eval), so every role reads a response the same way.
    """
    return token_logprobs(logits, labels)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits): (B, T, V) -> (B, T); -inf logits contribute 0.

    The implementation is ``rlhf.models.logprobs.token_entropy`` (see :func:`logprobs_from_logits`).
    """
    return token_entropy(logits)

# Added to the variance before the inverse square root in masked_whiten (as in TRL).
WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------- masked reductions


def _fill_masked(x: Tensor, mask: Tensor) -> Tensor:
    """x with every ``mask == 0`` entry replaced by 0. x, mask: broadcastable, e.g. (B, T).

    ``torch.where`` rather than ``x * mask`` so that ``inf``/``nan`` under the mask cannot leak
    (``nan * 0`` is ``nan``) into results or gradients.
    """
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_choice(value: str, choices: Any, name: str) -> None:
    """ValueError naming ``name`` and the valid values unless value is one of the Literal ``choices``."""
    valid = get_args(choices)
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of x over the entries where mask is non-zero (mask values act as weights).

    x: (B, T) or any shape; mask: same shape (or broadcastable to it).
    dim=None reduces over all entries -> scalar (a token mean over the batch, not a mean of
    per-row means); otherwise reduces over ``dim`` (e.g. dim=-1 -> (B,)).
    An empty mask (no non-zero entries) gives 0, not nan.
    """
    if not x.is_floating_point():
        x = x.float()
    mask = mask.to(dtype=x.dtype).expand_as(x)
    total = _fill_masked(x * mask, mask).sum(dim=dim)
    count = mask.sum(dim=dim)
    return total / count.clamp_min(torch.finfo(x.dtype).tiny)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all masked entries -> scalar. x, mask: (B, T).

    unbiased=True applies Bessel's correction n / (n - 1), with n the number of masked
    entries. With n <= 1 the result is 0 (not an error or nan), so a degenerate batch cannot
    crash a training step.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(dtype=var.dtype).sum()
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise x to mean 0 and (unbiased) variance 1 over the masked entries. x, mask: (B, T).

    Statistics come from all masked entries of the batch together. With shift_mean=False the
    mean is added back after scaling (TRL semantics: only the scale changes, used e.g. for
    rewards). Returns (B, T) with 0 at every ``mask == 0`` position.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _fill_masked(whitened, mask)


# --------------------------------------------------------------------------- KL estimators

KLKind = Literal["k1", "k2", "k3"]


def _kl_k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _kl_k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio**2


def _kl_k3(log_ratio: Tensor) -> Tensor:
    # exp(ref - logp) - (ref - logp) - 1, written with expm1 for accuracy near 0.
    d = -log_ratio
    return torch.expm1(d) - d


# Per-token estimators of KL(policy || ref) from samples of the policy, keyed by the names in
# http://joschu.net/blog/kl-approx.html. Each maps log_ratio = logp - ref_logp to an estimate.
_KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": _kl_k1,  # unbiased, high variance, can be negative
    "k2": _kl_k2,  # biased, low variance, >= 0
    "k3": _kl_k3,  # unbiased, low variance, >= 0
}
KL_KINDS: tuple[str, ...] = tuple(_KL_ESTIMATORS)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind | str = "k1") -> Tensor:
    """Per-token KL(policy || ref) estimate. logprobs, ref_logprobs: (B, T) -> (B, T).

    kind: "k1" = logp - ref; "k2" = 1/2 (logp - ref)^2; "k3" = exp(ref - logp) - (ref - logp) - 1.
    Not masked: callers mask (see :func:`shape_rewards`). Unknown kind -> ValueError.
    """
    try:
        estimator = _KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {kind!r}; valid kinds: {', '.join(KL_KINDS)}"
        ) from None
    return estimator(logprobs - ref_logprobs)


# --------------------------------------------------------------------------- rewards and GAE


def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    kind: KLKind | str = "k1",
) -> Tensor:
    """Per-token PPO rewards: a KL penalty on every response token plus the sequence score.

    scores: (B,) one reward-model score per row; logprobs, ref_logprobs, mask: (B, T).
    Returns (B, T): ``-kl_coef * kl_penalty(logprobs, ref_logprobs, kind)`` on response
    tokens, 0 on padding, and each row's score added at its last response token (the last
    index where mask == 1). A row with no response tokens gets all zeros (its score has no
    token to go to and such a row carries no loss anyway).
    """
    batch, length = mask.shape
    if scores.numel() != batch:
        raise ValueError(
            f"scores must have one value per row: got {tuple(scores.shape)}, B={batch}"
        )
    kl = kl_penalty(logprobs, ref_logprobs, kind)
    rewards = _fill_masked(-kl_coef * kl, mask)

    positions = torch.arange(length, device=mask.device).expand(batch, length)
    last = torch.where(mask != 0, positions, -1).amax(dim=-1)  # (B,), -1 for an empty row
    score = scores.reshape(batch).to(rewards.dtype) * (last >= 0)
    return rewards.scatter_add(1, last.clamp_min(0).unsqueeze(1), score.unsqueeze(1))


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). rewards, values, mask: (B, T).

    Returns ``(advantages, returns)``, both (B, T), detached, not whitened, 0 at padding;
    ``returns = advantages + values``. Each row's episode ends at its last response token:
    the value after it is 0 (no bootstrap into padding), i.e. for t in the response,
    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``
    with ``V``, ``A`` taken as 0 past the last response token.

    Padding is zero-filled first, so with right padding the recursion carries exactly 0 across
    it. Vectorised over the batch; loops over T backwards.
    """
    rewards = _fill_masked(rewards, mask)
    values = _fill_masked(values, mask)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    reversed_advs = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        next_value = values[:, t]
        reversed_advs.append(next_adv)
    advantages = _fill_masked(torch.stack(reversed_advs[::-1], dim=1), mask)
    returns = _fill_masked(advantages + values, mask)
    return advantages, returns


# --------------------------------------------------------------------------- critic-free advantages

GroupKind = Literal["grpo", "rloo"]


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    """scores (B,) as (B / k, k): row g holds the k consecutive samples of prompt g.

    k >= 2 because a baseline from the group needs another sample (with k = 1 every advantage
    would be 0, silently stopping learning).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group baseline needs k >= 2), got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(
            f"batch size B={scores.numel()} is not divisible by group_size={group_size}"
        )
    grouped = scores.reshape(-1, group_size)
    return grouped if grouped.is_floating_point() else grouped.float()


def group_advantages(
    scores: Tensor,
    group_size: int,
    kind: GroupKind = "grpo",
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """One advantage per sequence from the other samples of its prompt; no value model.

    scores: (B,), each group's ``group_size`` (k) rows consecutive; returns (B,).
    "grpo": ``(r - group mean) / (group std + eps)``, std unbiased (divide by k - 1);
    ``scale_by_std=False`` drops the division (Dr. GRPO: no bias towards low-variance groups).
    A group of equal scores gives 0, not nan.
    "rloo": ``r - mean of the other k - 1 rewards`` = ``k / (k - 1) * (r - group mean)``: the
    leave-one-out baseline does not depend on r, so the estimate stays unbiased.
    ValueError if k < 2 or k does not divide B.
    """
    _check_choice(kind, GroupKind, "group advantage kind")
    grouped = _grouped(scores, group_size)
    centered = grouped - grouped.mean(dim=-1, keepdim=True)
    if kind == "rloo":
        advantages = centered * (group_size / (group_size - 1))
    elif scale_by_std:
        advantages = centered / (grouped.std(dim=-1, keepdim=True) + eps)
    else:
        advantages = centered
    return advantages.reshape(-1)


def group_baseline(scores: Tensor, group_size: int) -> Tensor:
    """``r - its group mean`` for each score. scores: (B,), groups consecutive -> (B,).

    The REINFORCE++ baseline: subtracted from the score before :func:`shape_rewards`, it removes
    the prompt's difficulty from the reward without a value model. Same errors as
    :func:`group_advantages`.
    """
    return group_advantages(scores, group_size, "grpo", scale_by_std=False)


def spread_over_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """Each row's sequence advantage on every one of its response tokens, 0 on padding.

    advantages: (B,); mask: (B, T) -> (B, T) (the token-level input :func:`policy_loss` takes).
    """
    batch = mask.shape[0]
    if advantages.numel() != batch:
        raise ValueError(
            f"advantages must have one value per row: got {tuple(advantages.shape)}, B={batch}"
        )
    return _fill_masked(advantages.reshape(batch, 1).expand(mask.shape), mask)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Returns-to-go ``G_t = r_t + gamma * G_{t+1}`` of each row. rewards, mask: (B, T) -> (B, T).

    :func:`compute_gae` with zero values and lam = 1 (then ``A_t`` is exactly ``G_t``), so the
    episode ends at each row's last response token the same way; detached, 0 at padding.
    """
    returns, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return returns


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ advantages: whitened returns-to-go of per-token rewards. (B, T) -> (B, T).

    rewards: the output of :func:`shape_rewards` (scores optionally passed through
    :func:`group_baseline` first). Whitening over all valid tokens of the batch stands in for
    the value model as variance reduction; detached, 0 at padding.
    """
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


# --------------------------------------------------------------------------- losses and metrics

LossAggregation = Literal["token_mean", "sequence_mean"]


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, how: LossAggregation = "token_mean") -> Tensor:
    """The one place a per-token loss (B, T) becomes a scalar. mask: (B, T).

    "token_mean": :func:`masked_mean` over every valid token of the batch; long responses
    weigh more (each token counts once).
    "sequence_mean": each row's token mean, then the mean over rows that have a valid token
    (an empty row neither contributes nor counts; all rows empty -> 0); every response weighs
    the same whatever its length (the GRPO paper's form).

    Under data parallelism each rank aggregates its own shard and the gradients are averaged,
    i.e. the result is the mean over ranks of the per-rank values. That equals the global
    "sequence_mean" exactly when every rank holds the same number of non-empty rows (equal
    shard sizes, no empty rows), and the global "token_mean" only when every rank holds the
    same number of valid tokens; otherwise each rank weighs equally, so a token (or row) on a
    rank with fewer of them weighs more. The same holds across gradient-accumulation steps.
    """
    _check_choice(how, LossAggregation, "loss aggregation")
    if how == "token_mean":
        return masked_mean(per_token_loss, mask)
    row_means = masked_mean(per_token_loss, mask, dim=-1)  # (B,), 0 for an empty row
    return masked_mean(row_means, (mask != 0).any(dim=-1))


def loss_share(part_mask: Tensor, whole_mask: Tensor, how: LossAggregation = "token_mean") -> float:
    """Weight of ``aggregate_loss`` over some rows (``part_mask`` (b, T)) in the aggregate over all of
    them (``whole_mask`` (B, T)): valid tokens of the part over those of the whole ("token_mean"), or
    non-empty rows likewise ("sequence_mean"); 0 when the whole has none. The parts' aggregates times
    their shares sum to the whole's exactly, so chunked backward passes accumulate the gradient of
    one pass over the whole minibatch.
    """
    _check_choice(how, LossAggregation, "loss aggregation")
    if how == "token_mean":
        part, whole = part_mask.sum(), whole_mask.sum()  # mask values weigh tokens, as in masked_mean
    else:
        part, whole = (part_mask != 0).any(-1).sum(), (whole_mask != 0).any(-1).sum()
    return part.item() / whole.item() if whole.item() else 0.0


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    aggregation: LossAggregation = "token_mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate loss. All inputs (B, T); returns three scalars.

    loss = aggregate_loss(max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps))), by
    default a token mean over the whole batch, with ratio = exp(logprobs - old_logprobs);
    ``aggregation="sequence_mean"`` averages each row first (see :func:`aggregate_loss`).
    The metrics below are token means whatever the aggregation.
    clip_fraction = masked mean of (-A * clipped_ratio > -A * ratio): the share of tokens
    where the clipped branch is taken (those tokens give no gradient).
    approx_kl = masked mean of the "k2" estimator 1/2 (logp - old)^2 of KL(old || new).
    clip_fraction and approx_kl are detached metrics; only loss carries gradient.
    """
    # Zero the log-ratio under the mask before exp: a huge value there would make exp()
    # overflow to inf and its gradient inf * 0 = nan even though the position is masked out.
    log_ratio = _fill_masked(logprobs - old_logprobs, mask)
    advantages = _fill_masked(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_penalty(logprobs.detach(), old_logprobs, "k2"), mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> Tensor:
    """Clipped value loss. All inputs (B, T); returns a scalar.

    ``1/2 * masked_mean(max((v - R)^2, (clip(v, old - clip_eps, old + clip_eps) - R)^2))``:
    the pessimistic maximum stops the value head from moving more than clip_eps away from
    its rollout-time prediction in one update.
    """
    values = _fill_masked(values, mask)
    old_values = _fill_masked(old_values, mask)
    returns = _fill_masked(returns, mask)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    losses = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over masked tokens. values, returns, mask: (B, T) -> scalar.

    1 is a perfect value function, 0 is no better than predicting the mean return, negative
    is worse. nan or -inf when the returns have zero variance (undefined). Detached.
    """
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)


# --------------------------------------------------------------------------- KL controllers


class KLController:
    """Base for the KL coefficient controllers; ``.value`` is the current coefficient.

    ``state_dict()`` holds only the mutable state (the coefficient); hyperparameters come
    from the constructor (the config), so a resumed run may change them.
    """

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Adjust ``.value`` after a step with mean KL ``current_kl`` over ``n_steps`` samples."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        """The controller's state, e.g. for a checkpoint: ``{"value": coefficient}``."""
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        if "value" not in state:
            raise KeyError(f"KL controller state needs a 'value' key; got {sorted(state)}")
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value!r})"


class FixedKLController(KLController):
    """A constant KL coefficient; :meth:`update` does nothing."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        super().__init__(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""


class AdaptiveKLController(KLController):
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    Steers the observed KL towards ``target``: on each update
    ``e = clip(current_kl / target - 1, -0.2, 0.2)`` and ``value *= 1 + e * n_steps / horizon``.
    The clip bounds how fast the coefficient moves when the KL is far off target.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Scale ``.value`` by ``1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(value={self.value!r}, target={self.target!r}, "
            f"horizon={self.horizon!r})"
        )

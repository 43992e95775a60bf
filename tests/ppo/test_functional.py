"""Tests for rlhf.ppo.functional against hand-computed numbers, naive twins and edge cases."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlhf.dpo.loss import dpo_loss
from rlhf.models.logprobs import sequence_logprobs
from rlhf.ppo.config import PPOAlgoConfig
from rlhf.ppo.functional import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    compute_gae,
    discounted_returns,
    entropy_from_logits,
    explained_variance,
    group_advantages,
    group_baseline,
    kl_penalty,
    logprobs_from_logits,
    loss_share,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    reinforce_pp_advantages,
    shape_rewards,
    spread_over_tokens,
    temper_logits_,
    value_loss,
)


def lengths_to_mask(lengths: list[int], length: int) -> torch.Tensor:
    """Right-padded float mask (B, T) with row i having lengths[i] leading ones."""
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).float()


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-5
    )


# ------------------------------------------------------------------------------- masked stats


def test_masked_mean_is_token_mean_over_batch_and_per_row_with_dim():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = lengths_to_mask([3, 1], 3)
    # (1 + 2 + 3 + 4) / 4 = 2.5; a mean of row means would be (2 + 4) / 2 = 3.
    close(masked_mean(x, mask), 2.5)
    close(masked_mean(x, mask, dim=-1), [2.0, 4.0])
    close(masked_mean(x, mask.bool()), 2.5)  # bool masks work too


def test_masked_mean_empty_mask_is_zero_not_nan():
    x = torch.tensor([[1.0, float("nan")]])
    close(masked_mean(x, torch.zeros(1, 2)), 0.0)
    close(masked_mean(x, torch.tensor([[1.0, 0.0]]), dim=-1), [1.0])


def test_masked_var_biased_and_unbiased():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, -50.0, 7.0]])
    mask = lengths_to_mask([3, 1], 3)
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(masked_var(x, mask, unbiased=False), 5.0 / 4)
    close(masked_var(x, mask), 5.0 / 3)
    # a single masked entry: 0, not nan or an error
    close(masked_var(x, lengths_to_mask([1, 0], 3)), 0.0)


def test_masked_whiten_hand_example():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = lengths_to_mask([3], 4)
    # mean 2, unbiased var 1 -> (x - 2) / 1; padding -> 0
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], atol=1e-6)


def test_masked_whiten_gives_mean_zero_var_one_on_masked_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g) * 3 + 5
    mask = lengths_to_mask([7, 3, 1, 5], 7)
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0, atol=1e-5)
    close(masked_var(w, mask), 1.0, atol=1e-5)
    assert torch.all(w[mask == 0] == 0)

    kept = masked_whiten(x, mask, shift_mean=False)  # scale only: mean kept, var 1
    close(masked_mean(kept, mask), masked_mean(x, mask), atol=1e-5)
    close(masked_var(kept, mask), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------- logits


def test_logprobs_from_logits_hand_example():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # softmax [.25, .75], [.5, .5]
    labels = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.5)]])


def test_logprobs_from_logits_matches_log_softmax_gather_and_half_precision():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    reference = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (3, 5)
    close(out, reference, atol=1e-5)

    # bf16 logits are evaluated in fp32 (same numbers as upcasting first), result fp32.
    half = logits.to(torch.bfloat16)
    ref_half = torch.log_softmax(half.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    out_half = logprobs_from_logits(half, labels)
    assert out_half.dtype == torch.float32
    close(out_half, ref_half, atol=1e-5)


def test_entropy_from_logits_hand_example_and_minus_inf_logits():
    logits = torch.tensor(
        [[[0.0, math.log(3.0), -math.inf], [0.0, 0.0, -math.inf], [5.0, -math.inf, -math.inf]]]
    )
    # H([.25, .75]) = -(.25 ln .25 + .75 ln .75) = 0.5623351446; H([.5, .5]) = ln 2; H([1]) = 0
    expected = [[0.5623351446, math.log(2.0), 0.0]]
    logits.requires_grad_(True)
    out = entropy_from_logits(logits)
    assert torch.isfinite(out).all()
    close(out, expected, atol=1e-6)
    # The gradient is finite too, and 0 for the -inf logits; dH/dx_i = -p_i (ln p_i + H):
    # for [.25, .75], dH/dx_0 = -.25 (ln .25 + 0.5623351446) = 0.2059898 = -dH/dx_1.
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    close(logits.grad[0, 0], [0.2059898, -0.2059898, 0.0], atol=1e-6)
    close(logits.grad[0, 2], [0.0, 0.0, 0.0], atol=1e-6)


def test_entropy_from_logits_matches_categorical():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 9, generator=g) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    close(entropy_from_logits(logits), expected, atol=1e-5)
    out_half = entropy_from_logits(logits.to(torch.float16))
    assert out_half.dtype == torch.float32 and out_half.shape == (2, 4)
    close(out_half, expected, atol=1e-2)


# ------------------------------------------------------------------------------- KL


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # logp - ref = [0.5, -1.0]
        ("k1", [0.5, -1.0]),
        # 1/2 (logp - ref)^2
        ("k2", [0.125, 0.5]),
        # d = ref - logp = [-0.5, 1.0]; exp(d) - d - 1 = [0.6065306597 - 0.5, e - 2]
        ("k3", [0.1065306597, 0.7182818285]),
    ],
)
def test_kl_penalty_kinds_on_numbers(kind, expected):
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    close(kl_penalty(logp, ref, kind), [expected], atol=1e-7)


def test_kl_penalty_default_is_k1_and_unknown_kind_lists_valid_names():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    close(kl_penalty(logp, ref), [[0.5]])
    assert set(KL_KINDS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match=r"k1, k2, k3") as err:
        kl_penalty(logp, ref, "k4")
    assert "'k4'" in str(err.value)


# ------------------------------------------------------------------------------- rewards


def test_shape_rewards_hand_example_with_ragged_rows():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -1.0, -3.0]])
    mask = lengths_to_mask([3, 2], 3)
    # k1 = logp - ref: row 0 [0.5, -1, 0], row 1 [-0.5, 0, pad]; reward = -0.1 * k1,
    # plus the score at the last response token (index 2 in row 0, index 1 in row 1).
    close(
        shape_rewards(scores, logp, ref, mask, kl_coef=0.1),
        [[-0.05, 0.1, 2.0], [0.05, -1.0, 0.0]],
    )
    # k3 = exp(d) - d - 1 with d = ref - logp:
    #   row 0: d = [-0.5, 1, 0] -> [0.60653066 - 0.5, e - 2, 0] = [0.10653066, 0.71828183, 0]
    #   row 1: d = [0.5, 0]     -> [1.64872127 - 1.5, 0]       = [0.14872127, 0]
    close(
        shape_rewards(scores, logp, ref, mask, kl_coef=0.1, kind="k3"),
        [[-0.010653066, -0.071828183, 2.0], [-0.014872127, -1.0, 0.0]],
    )


def test_shape_rewards_empty_row_gets_zeros_and_bad_scores_shape_raises():
    logp = torch.zeros(2, 3)
    mask = lengths_to_mask([2, 0], 3)
    out = shape_rewards(torch.tensor([1.0, 5.0]), logp, logp - 1, mask, kl_coef=0.5)
    close(out, [[-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="one value per row"):
        shape_rewards(torch.tensor([1.0, 2.0, 3.0]), logp, logp, mask, kl_coef=0.1)


# ------------------------------------------------------------------------------- GAE


def test_compute_gae_hand_example():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.6, 9.0]])
    mask = lengths_to_mask([3, 2], 3)
    # Row 0 (length 3):
    #   t=2: delta = 1 + 0.9*0 - 0.3 = 0.7                 A2 = 0.7
    #   t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13             A1 = -0.13 + 0.72*0.7 = 0.374
    #   t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14             A0 = -0.14 + 0.72*0.374 = 0.12928
    #   returns = A + V = [0.62928, 0.774, 1.0]
    # Row 1 (length 2; the 5.0 reward and 9.0 value are padding and must be ignored):
    #   t=1: delta = 1 + 0.9*0 - 0.6 = 0.4                 A1 = 0.4
    #   t=0: delta = 0.2 + 0.9*0.6 - 0.1 = 0.64            A0 = 0.64 + 0.72*0.4 = 0.928
    #   returns = [1.028, 1.0, 0]
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    close(adv, [[0.12928, 0.374, 0.7], [0.928, 0.4, 0.0]])
    close(ret, [[0.62928, 0.774, 1.0], [1.028, 1.0, 0.0]])


def naive_gae(rewards, values, lengths, gamma, lam):
    """Per-row python-loop GAE over plain floats, episode ending at each row's length."""
    batch, length = len(rewards), len(rewards[0])
    advs = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        running = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            advs[b][t] = running
    rets = [
        [advs[b][t] + values[b][t] if t < lengths[b] else 0.0 for t in range(length)]
        for b in range(batch)
    ]
    return advs, rets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_gae_matches_naive_loop_on_random_ragged_batches(seed):
    g = torch.Generator().manual_seed(seed)
    batch, length = 6, 9
    lengths = torch.randint(0, length + 1, (batch,), generator=g).tolist()
    lengths[0] = length  # always one full row
    rewards = torch.randn(batch, length, generator=g, dtype=torch.float64)
    values = torch.randn(batch, length, generator=g, dtype=torch.float64)
    gamma, lam = 0.97, 0.9
    adv, ret = compute_gae(rewards, values, lengths_to_mask(lengths, length), gamma, lam)
    exp_adv, exp_ret = naive_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    close(adv, exp_adv, atol=1e-10)
    close(ret, exp_ret, atol=1e-10)


def test_compute_gae_outputs_are_detached():
    values = torch.ones(1, 3, requires_grad=True)
    adv, ret = compute_gae(torch.ones(1, 3), values, torch.ones(1, 3), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


# ------------------------------------------------------------------------------- losses


def policy_example():
    """2x3 batch, five response tokens, clip_eps 0.2:

    token  A   ratio  -A*ratio  -A*clip(ratio)  max    clipped branch taken?
    a     +1   1.5    -1.5      -1.2            -1.2   yes (positive A, ratio too high)
    b     -1   0.5     0.5       0.8             0.8   yes (negative A, ratio too low)
    c     +1   0.5    -0.5      -0.8            -0.5   no  (pessimistic side)
    d     -2   1.5     3.0       2.4             3.0   no  (pessimistic side)
    e     +2   1.1    -2.2      -2.2            -2.2   no  (inside the clip range)
    loss = (-1.2 + 0.8 - 0.5 + 3.0 - 2.2) / 5 = -0.02; clip_fraction = 2 / 5 = 0.4
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -0.7]])
    log_ratio = torch.tensor(
        [[math.log(1.5), math.log(0.5), math.log(0.5)], [math.log(1.5), math.log(1.1), 0.0]]
    )
    logp = old + log_ratio
    adv = torch.tensor([[1.0, -1.0, 1.0], [-2.0, 2.0, 0.0]])
    mask = lengths_to_mask([3, 2], 3)
    return logp, old, adv, mask


def test_policy_loss_hand_example_clipping_for_both_advantage_signs():
    logp, old, adv, mask = policy_example()
    logp.requires_grad_(True)
    loss, clip_fraction, approx_kl = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    close(loss, -0.02, atol=1e-6)  # a mean of row means would be (-0.3 + 0.4) / 2 = 0.05
    close(clip_fraction, 0.4)
    # k2: mean of 1/2 (log ratio)^2 over the five tokens
    squares = [
        math.log(1.5) ** 2,
        math.log(0.5) ** 2,
        math.log(0.5) ** 2,
        math.log(1.5) ** 2,
        math.log(1.1) ** 2,
    ]
    close(approx_kl, 0.5 * sum(squares) / 5)
    assert not clip_fraction.requires_grad and not approx_kl.requires_grad

    # d loss / d logp = -A * ratio / 5 on unclipped tokens, 0 on clipped ones and padding:
    # c: -1*0.5/5 = -0.1, d: 2*1.5/5 = 0.6, e: -2*1.1/5 = -0.44
    loss.backward()
    close(logp.grad, [[0.0, 0.0, -0.1], [0.6, -0.44, 0.0]], atol=1e-6)


def test_policy_loss_counts_only_the_clipped_sign():
    # Only positive advantages with ratio above 1 + eps are clipped -> 1 of 2 tokens.
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(1.5)]])
    adv = torch.tensor([[1.0, -1.0]])
    _, clip_fraction, _ = policy_loss(logp, old, adv, torch.ones(1, 2), clip_eps=0.2)
    close(clip_fraction, 0.5)
    # no clipping at all when ratio == 1 -> loss = -mean(A)
    loss, clip_fraction, approx_kl = policy_loss(old, old, adv * 3, torch.ones(1, 2), 0.2)
    close(loss, 0.0)
    close(clip_fraction, 0.0)
    close(approx_kl, 0.0)


def test_value_loss_hand_example_with_clipping():
    # clip_eps 0.2:
    #  v    old  R    clip(v)  (v-R)^2  (clip-R)^2  max
    #  1.0  0.5  1.0  0.7      0        0.09        0.09  (clipped branch)
    #  1.0  0.5  0.0  0.7      1        0.49        1     (unclipped branch)
    #  0.6  0.5  2.0  0.6      1.96     1.96        1.96  (inside the clip range)
    # loss = 1/2 * (0.09 + 1 + 1.96) / 3 = 0.508333...
    values = torch.tensor([[1.0, 1.0], [0.6, 42.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5], [0.5, -3.0]])
    returns = torch.tensor([[1.0, 0.0], [2.0, 11.0]])
    mask = lengths_to_mask([2, 1], 2)
    loss = value_loss(values, old, returns, mask, clip_eps=0.2)
    close(loss, 0.5 * 3.05 / 3)
    # gradient: 0 on the clipped token, (v - R) / 3 elsewhere: 1/3 and -1.4/3
    loss.backward()
    close(values.grad, [[0.0, 1.0 / 3], [-1.4 / 3, 0.0]])
    # with a huge clip range, it is the plain 1/2 MSE: 1/2 * (0 + 1 + 1.96) / 3
    close(value_loss(values, old, returns, mask, clip_eps=100.0), 0.5 * 2.96 / 3)


def test_explained_variance_hand_examples():
    returns = torch.tensor([[1.0, 2.0, 3.0], [50.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    close(explained_variance(returns, returns, mask), 1.0)  # perfect
    close(explained_variance(torch.zeros(2, 3), returns, mask), 0.0)  # Var(R)/Var(R)
    # R - V = [-0.5, 0, 0.5]: Var = 0.25 (unbiased); Var(R) = 1 -> 1 - 0.25 = 0.75
    values = torch.tensor([[1.5, 2.0, 2.5], [-7.0, 0.0, 0.0]])
    out = explained_variance(values, returns, mask)
    assert out.dtype == torch.float32
    close(out, 0.75)


# ------------------------------------------------------------------------------- masking


def all_results(rewards, values, old_values, logp, old_logp, ref_logp, mask):
    """Every masked function's output on one batch, for before/after comparisons."""
    scores = torch.tensor([1.0, -2.0, 0.5])
    adv, ret = compute_gae(rewards, values, mask, 0.9, 0.8)
    return {
        "mean": masked_mean(values, mask),
        "var": masked_var(values, mask),
        "whiten": masked_whiten(values, mask),
        "whiten_keep": masked_whiten(values, mask, shift_mean=False),
        "rewards": shape_rewards(scores, logp, ref_logp, mask, 0.1, "k3"),
        "adv": adv,
        "ret": ret,
        "policy": policy_loss(logp, old_logp, adv, mask, 0.2),
        "policy_seq": policy_loss(logp, old_logp, adv, mask, 0.2, aggregation="sequence_mean"),
        "value": value_loss(values, old_values, ret, mask, 0.2),
        "ev": explained_variance(values, ret, mask),
        "returns_to_go": discounted_returns(rewards, mask, 0.9),
        "reinforce_pp": reinforce_pp_advantages(rewards, mask, 0.9),
        "spread": spread_over_tokens(scores, mask),
        "seq_mean": aggregate_loss(values, mask, "sequence_mean"),
        "seq_logp": sequence_logprobs(logp, mask),
    }


@pytest.mark.parametrize("garbage", [1e4, float("inf"), float("nan")])
def test_values_under_mask_do_not_change_any_result(garbage):
    g = torch.Generator().manual_seed(3)
    mask = lengths_to_mask([5, 2, 4], 5)
    clean = [torch.randn(3, 5, generator=g) * 0.5 for _ in range(6)]
    dirty = [torch.where(mask == 0, torch.full_like(t, garbage), t) for t in clean]
    expected = all_results(*clean, mask)
    actual = all_results(*dirty, mask)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def test_nan_under_mask_gives_finite_gradients():
    mask = lengths_to_mask([3, 1], 3)
    nan_pad = torch.where(mask == 0, float("nan"), 0.0)
    logp = (torch.full((2, 3), -1.0) + nan_pad).requires_grad_(True)
    values = (torch.full((2, 3), 0.3) + nan_pad).requires_grad_(True)
    loss, _, _ = policy_loss(logp, torch.full((2, 3), -1.2), torch.ones(2, 3) + nan_pad, mask, 0.2)
    (loss + value_loss(values, torch.zeros(2, 3), torch.ones(2, 3) + nan_pad, mask, 0.2)).backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all() and torch.isfinite(values.grad).all()
    assert torch.all(logp.grad[mask == 0] == 0) and torch.all(values.grad[mask == 0] == 0)


# ------------------------------------------------------------------------------- KL controllers


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        (12.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # 12/6 - 1 = 1 -> clipped to 0.2
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # 6.6/6 - 1 = 0.1, not clipped
        (6.0, 0.1),  # on target: unchanged
        (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # 0/6 - 1 = -1 -> clipped to -0.2
        (torch.tensor(3.0), 0.1 * (1 - 0.2 * 256 / 10000)),  # tensors accepted; -0.5 -> -0.2
    ],
)
def test_adaptive_kl_controller_update(current_kl, expected):
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    assert ctl.value == 0.1
    ctl.update(current_kl, n_steps=256)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_kl_controller_compounds_and_round_trips_state():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)
    ctl.update(12.0, 256)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) ** 2, rel=1e-12)

    state = ctl.state_dict()
    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    ctl.update(3.0, 64)
    restored.update(3.0, 64)
    assert restored.value == ctl.value
    with pytest.raises(KeyError, match="value"):
        restored.load_state_dict({})


def test_fixed_kl_controller_is_constant_and_round_trips_state():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05
    other = FixedKLController(0.2)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_kl_controllers_reject_bad_hyperparameters():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)


# --------------------------------------------------------------------------- temperature


def test_temper_logits_keeps_the_tensor_at_temperature_one() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # (1, 1, 2): p = (1/4, 3/4)
    assert temper_logits_(logits, 1.0) is logits
    logp = logprobs_from_logits(temper_logits_(logits, 1.0), torch.tensor([[1]]))
    assert logp.item() == pytest.approx(math.log(3 / 4), abs=1e-7)


def test_temper_logits_divides_in_place_with_the_right_gradient() -> None:
    # T = 0.5: logits (0, 2 ln 3) -> p = (1/10, 9/10); d log p_1 / d x = (onehot - p) / T.
    x = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    logits = x * 1.0  # a fresh non-leaf, like a model's output
    tempered = temper_logits_(logits, 0.5)
    assert tempered is logits
    logp = logprobs_from_logits(tempered, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(math.log(0.9), abs=1e-6)
    logp.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[-0.2, 0.2]]]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- KL horizon


def test_default_kl_horizon_adapts_within_twenty_iterations() -> None:
    """At the defaults (16 documents an iteration, horizon 320) and a KL twice the target, the
    error clips to 0.2 and each iteration scales the coefficient by 1 + 0.2 * 16 / 320 = 1.01:
    1.01 ** 20 = 1.2202 after 20 iterations (the old 10000: 1.00032 ** 20 = 1.0064)."""
    algo = PPOAlgoConfig()
    assert (algo.rollout_batch_size, algo.kl_horizon) == (16, 320)
    ctl = AdaptiveKLController(algo.kl_coef, target=6.0, horizon=algo.kl_horizon)
    for _ in range(20):
        ctl.update(12.0, n_steps=algo.rollout_batch_size)
    assert ctl.value == pytest.approx(algo.kl_coef * 1.01**20, rel=1e-12)
    assert ctl.value >= 1.2 * algo.kl_coef


def test_kl_horizon_help_states_it_in_iterations() -> None:
    [field] = [f for f in dataclasses.fields(PPOAlgoConfig) if f.name == "kl_horizon"]
    help_text = field.metadata["help"]
    assert "kl_horizon / rollout_batch_size iterations" in help_text
    assert "320 / 16 = 20" in help_text


# --------------------------------------------------------------------------- critic-free advantages

GROUP_SCORES = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two groups of k = 3


def test_grpo_advantages_hand_example() -> None:
    # Group [1, 2, 6]: mean 3, centered [-2, -1, 3], unbiased var (4 + 1 + 9) / 2 = 7, std 2.6457513
    #   -> [-0.7559289, -0.3779645, 1.1338934] (a biased std 2.1602 would give -0.9258 first).
    # Group [0, 0, 3]: mean 1, centered [-1, -1, 2], var (1 + 1 + 4) / 2 = 3, std 1.7320508
    #   -> [-0.5773503, -0.5773503, 1.1547005]
    out = group_advantages(GROUP_SCORES, 3)
    close(out, [-0.7559289, -0.3779645, 1.1338934, -0.5773503, -0.5773503, 1.1547005], atol=1e-5)
    # scores [1, 2, 3, 6], k = 2: means 1.5, 4.5; stds 0.7071068, 2.1213203 -> +-0.5 / 0.7071068
    # and +-1.5 / 2.1213203, both 0.7071068 in size.
    close(group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2),
          [-0.7071068, 0.7071068, -0.7071068, 0.7071068], atol=1e-5)


def test_grpo_without_std_scaling_and_group_baseline_are_the_centered_scores() -> None:
    # Dr. GRPO: r - group mean only: [1, 2, 6] - 3 and [0, 0, 3] - 1.
    expected = [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]
    close(group_advantages(GROUP_SCORES, 3, scale_by_std=False), expected)
    close(group_baseline(GROUP_SCORES, 3), expected)


def test_rloo_advantages_subtract_the_mean_of_the_others() -> None:
    # r=1: others 2, 6 -> 1 - 4 = -3;  r=2: others 1, 6 -> 2 - 3.5 = -1.5;  r=6: 6 - 1.5 = 4.5
    # r=0: others 0, 3 -> -1.5 (twice);  r=3: others 0, 0 -> 3   (= 3/2 * centered scores)
    close(group_advantages(GROUP_SCORES, 3, "rloo"), [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_group_of_equal_scores_gives_zero_not_nan() -> None:
    scores = torch.tensor([5.0, 5.0, 5.0, 1.0, 2.0, 3.0])
    for kind in ("grpo", "rloo"):
        out = group_advantages(scores, 3, kind)
        assert torch.isfinite(out).all(), kind
        close(out[:3], [0.0, 0.0, 0.0])
    close(group_advantages(scores, 3)[3:], [-1.0, 0.0, 1.0], atol=1e-5)  # std of [1, 2, 3] is 1


def test_group_advantages_reject_bad_group_sizes_and_kinds() -> None:
    with pytest.raises(ValueError, match=r"B=5.*group_size=2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"B=5.*group_size=2"):
        group_baseline(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ValueError, match=r"'ppo'.*grpo, rloo"):
        group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


def test_spread_over_tokens_puts_each_row_advantage_on_its_response() -> None:
    mask = lengths_to_mask([3, 1], 3)
    close(spread_over_tokens(torch.tensor([0.5, -2.0]), mask), [[0.5, 0.5, 0.5], [-2.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="one value per row"):
        spread_over_tokens(torch.zeros(3), mask)


def returns_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards with a nan in the padding of row 1, and their mask (lengths 3, 2)."""
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, float("nan")]])
    return rewards, lengths_to_mask([3, 2], 3)


def test_discounted_returns_with_gamma_below_one_and_padding() -> None:
    rewards, mask = returns_example()
    # gamma 0.5. Row 0: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5.
    # Row 1 (ends at t=1; the nan is padding): G1 = 4, G0 = 3 + 0.5*4 = 5, pad -> 0.
    out = discounted_returns(rewards, mask, 0.5)
    close(out, [[1.5, 1.0, 2.0], [5.0, 4.0, 0.0]])
    close(discounted_returns(rewards, mask, 1.0), [[3.0, 2.0, 2.0], [7.0, 4.0, 0.0]])
    assert not discounted_returns(rewards.requires_grad_(True), mask, 0.5).requires_grad


def test_reinforce_pp_whitening_ignores_padded_tokens() -> None:
    rewards, mask = returns_example()
    # Valid returns (gamma 0.5) [1.5, 1, 2 | 5, 4]: mean 13.5 / 5 = 2.7 (counting the pad 0 would
    # give 2.25); deviations [-1.2, -1.7, -0.7, 2.3, 1.3], squares sum 11.8, unbiased var 2.95,
    # std 1.7175564 -> [-0.6986672, -0.9897785, -0.4075558, 1.3391222, 0.7568998], pad 0.
    out = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    close(out, [[-0.6986672, -0.9897785, -0.4075558], [1.3391222, 0.7568998, 0.0]], atol=1e-5)


def test_reinforce_pp_composes_group_baseline_shape_rewards_and_whitening() -> None:
    # Scores [1, 3] in one group of 2 -> baseline [-1, 1]; no KL (logp == ref); lengths [2, 1].
    # Shaped rewards [[0, -1], [1, pad]] -> returns-to-go (gamma 1) [[-1, -1], [1, pad]];
    # valid [-1, -1, 1]: mean -1/3, deviations [-2/3, -2/3, 4/3], var (4 + 4 + 16) / 9 / 2 = 4/3,
    # std 1.1547005 -> [-0.5773503, -0.5773503, 1.1547005].
    mask = lengths_to_mask([2, 1], 2)
    logp = torch.full((2, 2), -1.0)
    rewards = shape_rewards(group_baseline(torch.tensor([1.0, 3.0]), 2), logp, logp, mask, 0.1)
    close(rewards, [[0.0, -1.0], [1.0, 0.0]])
    out = reinforce_pp_advantages(rewards, mask)
    close(out, [[-0.5773503, -0.5773503], [1.1547005, 0.0]], atol=1e-5)


# --------------------------------------------------------------------------- loss aggregation


def test_loss_shares_of_chunks_sum_their_aggregates_to_the_whole() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0], [7.0, 7.0, 7.0], [4.0, 6.0, 99.0]])
    mask = lengths_to_mask([3, 1, 0], 3)
    mask = torch.cat([mask, lengths_to_mask([2], 3)])  # rows: 3, 1, 0 and 2 valid tokens
    first, second = slice(0, 2), slice(2, 4)
    # token mean: 4 of the 6 valid tokens are in the first chunk, 2 in the second
    assert loss_share(mask[first], mask) == pytest.approx(4 / 6)
    assert loss_share(mask[second], mask, "token_mean") == pytest.approx(2 / 6)
    # sequence mean: 2 of the 3 non-empty rows are in the first chunk
    assert loss_share(mask[first], mask, "sequence_mean") == pytest.approx(2 / 3)
    assert loss_share(mask[second], mask, "sequence_mean") == pytest.approx(1 / 3)
    for how in ("token_mean", "sequence_mean"):
        parts = sum(loss_share(mask[rows], mask, how) * aggregate_loss(loss[rows], mask[rows], how)
                    for rows in (first, second))
        close(parts, aggregate_loss(loss, mask, how).item())
    close(aggregate_loss(loss, mask, "token_mean"), (1 + 2 + 3 + 10 + 4 + 6) / 6)
    close(aggregate_loss(loss, mask, "sequence_mean"), (2 + 10 + 5) / 3)
    assert loss_share(torch.zeros(1, 3), torch.zeros(2, 3)) == 0.0  # nothing valid: no share


def test_aggregate_loss_token_vs_sequence_mean_on_rows_of_different_lengths() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0], [7.0, 7.0, 7.0]], requires_grad=True)
    mask = lengths_to_mask([3, 1, 0], 3)  # the third row is empty
    # token mean: (1 + 2 + 3 + 10) / 4 = 4
    close(aggregate_loss(loss, mask, "token_mean"), 4.0)
    close(aggregate_loss(loss, mask), 4.0)  # the default
    # sequence mean: row means 2 and 10; the empty row is not counted -> (2 + 10) / 2 = 6
    seq = aggregate_loss(loss, mask, "sequence_mean")
    close(seq, 6.0)
    # gradient: 1 / (2 rows * 3 tokens) on row 0, 1 / (2 * 1) on row 1's token, 0 elsewhere
    seq.backward()
    close(loss.grad, [[1 / 6, 1 / 6, 1 / 6], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(aggregate_loss(loss, torch.zeros(3, 3), "sequence_mean"), 0.0)  # all empty -> 0
    with pytest.raises(ValueError, match=r"'sum'.*token_mean, sequence_mean"):
        aggregate_loss(loss, mask, "sum")


def test_policy_loss_sequence_mean_aggregation() -> None:
    # policy_example: row 0 token losses [-1.2, 0.8, -0.5] -> mean -0.3; row 1 [3.0, -2.2] -> 0.4;
    # sequence mean (-0.3 + 0.4) / 2 = 0.05 (the token mean is -0.02); metrics stay token means.
    logp, old, adv, mask = policy_example()
    loss, clip_fraction, _ = policy_loss(logp, old, adv, mask, 0.2, aggregation="sequence_mean")
    close(loss, 0.05, atol=1e-6)
    close(clip_fraction, 0.4)
    close(policy_loss(logp, old, adv, mask, 0.2, aggregation="token_mean")[0], -0.02, atol=1e-6)


# --------------------------------------------------------------------------- preference optimisation


def test_sequence_logprobs_is_the_masked_sum() -> None:
    token_logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("nan"), 7.0]])
    close(sequence_logprobs(token_logp, lengths_to_mask([3, 1], 3)), [-6.0, -0.5])
    close(sequence_logprobs(token_logp, lengths_to_mask([0, 1], 3).bool()), [0.0, -0.5])


def dpo_example() -> tuple[torch.Tensor, ...]:
    """Two pairs, beta 0.5: policy - ref for chosen [1, 0] and rejected [-0.5, 1], so
    h = [1.5, -1] and beta * h = [0.75, -0.5]."""
    policy_chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy_rejected = torch.tensor([-3.0, -1.0], requires_grad=True)
    ref_chosen = torch.tensor([-2.0, -2.0], requires_grad=True)
    ref_rejected = torch.tensor([-2.5, -2.0], requires_grad=True)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_dpo_sigmoid_loss_and_rewards() -> None:
    # -logsigmoid(x) = log(1 + e^-x): x = 0.75 -> log(1.4723666) = 0.3868710;
    # x = -0.5 -> log(1 + e^0.5) = log(2.6487213) = 0.9740770.
    losses, chosen, rejected = dpo_loss(*dpo_example(), beta=0.5)
    close(losses, [0.3868710, 0.9740770])
    # rewards beta * (pi - ref): chosen 0.5 * [1, 0], rejected 0.5 * [-0.5, 1]
    close(chosen, [0.5, 0.0])
    close(rejected, [-0.25, 0.5])
    assert not chosen.requires_grad and not rejected.requires_grad


def test_dpo_sigmoid_with_label_smoothing() -> None:
    # e = 0.1: 0.9 * -logsigmoid(bh) + 0.1 * -logsigmoid(-bh), and -logsigmoid(-x) = -logsigmoid(x) + x:
    # pair 0: 0.9 * 0.3868710 + 0.1 * (0.3868710 + 0.75) = 0.4618710
    # pair 1: 0.9 * 0.9740770 + 0.1 * (0.9740770 - 0.5) = 0.9240770
    losses, _, _ = dpo_loss(*dpo_example(), beta=0.5, label_smoothing=0.1)
    close(losses, [0.4618710, 0.9240770])


def test_ipo_loss() -> None:
    # (h - 1 / (2 beta))^2 with 1 / (2 * 0.5) = 1: (1.5 - 1)^2 = 0.25, (-1 - 1)^2 = 4
    losses, chosen, rejected = dpo_loss(*dpo_example(), beta=0.5, kind="ipo")
    close(losses, [0.25, 4.0])
    close(chosen, [0.5, 0.0])
    close(rejected, [-0.25, 0.5])


def test_dpo_gradient_flows_to_policy_logps_only() -> None:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = dpo_example()
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    losses.sum().backward()
    # d/dpi_c -logsigmoid(beta h) = -beta * sigmoid(-beta h): -0.5 * sigmoid(-0.75) = -0.1604107,
    # -0.5 * sigmoid(0.5) = -0.3112297; the rejected gradient is the negative.
    close(policy_chosen.grad, [-0.1604107, -0.3112297])
    close(policy_rejected.grad, [0.1604107, 0.3112297])
    assert ref_chosen.grad is None and ref_rejected.grad is None


def test_dpo_loss_rejects_bad_arguments() -> None:
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(*dpo_example(), beta=beta)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*dpo_example(), beta=0.5, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*dpo_example(), beta=0.5, kind="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"'hinge'.*sigmoid, ipo"):
        dpo_loss(*dpo_example(), beta=0.5, kind="hinge")

"""rlhf.losses against naive loops and hand-computed values."""

import math

import pytest
import torch

from rlhf.losses import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    chunked_entropy,
    compute_gae,
    compute_rewards,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    selective_log_softmax,
)


def right_padded_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


# --- masked statistics -------------------------------------------------------------------------------------------


def test_masked_mean_ignores_garbage_and_empty_rows_give_zero() -> None:
    x = torch.tensor([[1.0, 3.0, float("nan")], [float("inf"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask) == 2.0
    assert torch.equal(masked_mean(x, mask, dim=1), torch.tensor([2.0, 0.0]))


def test_masked_mean_normaliser_gives_global_token_mean_across_micro_batches() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    mask = right_padded_mask([6, 1, 2, 5], 6)
    micro = [(x[:1], mask[:1]), (x[1:], mask[1:])]  # 6 and 8 tokens
    total = mask.sum()
    accumulated = sum(masked_mean(xm, mm, normaliser=total) for xm, mm in micro)
    assert torch.allclose(accumulated, masked_mean(x, mask))
    naive = sum(masked_mean(xm, mm) for xm, mm in micro) / len(micro)
    assert not torch.allclose(naive, masked_mean(x, mask))  # the pitfall the normaliser exists for


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_torch_var_on_selected_entries(unbiased: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 7)
    mask = torch.rand(5, 7) > 0.4
    expected = torch.var(x[mask], unbiased=unbiased)
    assert torch.allclose(masked_var(x, mask, unbiased=unbiased), expected, atol=1e-6)


def test_masked_var_refuses_too_few_entries() -> None:
    x, one = torch.randn(2, 3), torch.zeros(2, 3)
    one[0, 1] = 1
    with pytest.raises(ValueError):
        masked_var(x, one, unbiased=True)
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros(2, 3), unbiased=False)
    assert masked_var(x, one, unbiased=False) == 0


def test_masked_whiten_mean_zero_var_one_and_zero_on_masked() -> None:
    torch.manual_seed(2)
    x = 3.0 + 5.0 * torch.randn(6, 10)
    mask = right_padded_mask([10, 3, 7, 1, 0, 9], 10)
    x[mask == 0] = float("inf")  # garbage in padding must not leak
    w = masked_whiten(x, mask)
    valid = mask.bool()
    assert abs(w[valid].mean().item()) < 1e-5
    assert abs(w[valid].var().item() - 1.0) < 1e-4
    assert torch.equal(w[~valid], torch.zeros_like(w[~valid]))


def test_masked_whiten_without_shift_keeps_mean() -> None:
    torch.manual_seed(3)
    x = 3.0 + 5.0 * torch.randn(4, 8)
    mask = torch.ones(4, 8)
    w = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(w.mean(), x.mean(), atol=1e-5)
    assert abs(w.var().item() - 1.0) < 1e-4


def test_masked_whiten_leaves_fewer_than_8_values_unchanged() -> None:
    x = torch.arange(10.0).reshape(2, 5)
    mask = right_padded_mask([4, 3], 5)  # 7 valid values
    assert torch.equal(masked_whiten(x, mask), x * mask)


def test_entropy_uniform_is_log_v_and_matches_categorical() -> None:
    V = 13
    assert torch.allclose(chunked_entropy(torch.zeros(2, 3, V)), torch.full((2, 3), math.log(V)))
    torch.manual_seed(7)
    logits = 3 * torch.randn(2, 3, V)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(chunked_entropy(logits), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5), (17,)])  # padded [B, T] and packed [N] token layouts
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_selective_log_softmax_matches_full_log_softmax_with_temperature_and_gradients(
    shape, chunk_tokens
) -> None:
    torch.manual_seed(8)
    V, temperature = 11, 0.7
    logits = (3 * torch.randn(*shape, V)).requires_grad_()
    labels = torch.randint(0, V, shape)
    oracle = torch.log_softmax(logits / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ours = selective_log_softmax(logits, labels, temperature, chunk_tokens=chunk_tokens)
    assert ours.shape == labels.shape
    assert torch.allclose(ours, oracle, atol=1e-6)
    weights = torch.randn(shape)  # a non-uniform upstream gradient, so every token's gradient is checked
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_oracle,) = torch.autograd.grad((oracle * weights).sum(), logits)
    assert torch.allclose(g_ours, g_oracle, atol=1e-6)


def test_selective_log_softmax_upcasts_bf16_and_rejects_zero_temperature() -> None:
    torch.manual_seed(9)
    logits = torch.randn(2, 3, 7).bfloat16()
    labels = torch.randint(0, 7, (2, 3))
    ours = selective_log_softmax(logits, labels, chunk_tokens=2)
    assert ours.dtype == torch.float32
    oracle = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ours, oracle, atol=1e-6)
    assert selective_log_softmax(logits[:, :0], labels[:, :0]).shape == (2, 0)
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(logits, labels, temperature=0.0)


@pytest.mark.parametrize("chunk_tokens", [2, 1024])
def test_chunked_entropy_matches_entropy_of_scaled_logits_with_gradients(chunk_tokens) -> None:
    torch.manual_seed(10)
    temperature = 0.7
    logits = (3 * torch.randn(2, 5, 13)).requires_grad_()
    oracle = torch.distributions.Categorical(logits=logits / temperature).entropy()
    ours = chunked_entropy(logits, temperature, chunk_tokens=chunk_tokens)
    assert torch.allclose(ours, oracle, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_oracle,) = torch.autograd.grad(oracle.sum(), logits)
    assert torch.allclose(g_ours, g_oracle, atol=1e-5)


# --- KL estimators -------------------------------------------------------------------------------------------------


def test_kl_estimators_on_hand_values() -> None:
    log2 = math.log(2)
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    logq = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    k1 = kl_penalty(logp, logq, "k1")
    assert torch.allclose(k1, torch.tensor([log2, -log2, 0.0]), atol=1e-6)  # k1 can be negative
    assert torch.allclose(kl_penalty(logp, logq, "k2"), torch.tensor([0.5 * log2**2, 0.5 * log2**2, 0.0]))
    # k3 = (r - 1) - log r with r = q / p: r = 0.5 -> -0.5 + log 2; r = 2 -> 1 - log 2; r = 1 -> 0
    k3 = kl_penalty(logp, logq, "k3")
    assert torch.allclose(k3, torch.tensor([-0.5 + log2, 1 - log2, 0.0]), atol=1e-6)
    assert (k3 >= 0).all() and k3[2] == 0
    assert torch.allclose(kl_penalty(logp, logq, "abs"), torch.tensor([log2, log2, 0.0]), atol=1e-6)


def test_kl_unknown_estimator_raises() -> None:
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")  # type: ignore[arg-type]


# --- rewards -------------------------------------------------------------------------------------------------------


def naive_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    rewards = torch.zeros_like(kl)
    for b in range(kl.shape[0]):
        last = None
        for t in range(kl.shape[1]):
            if mask[b, t]:
                rewards[b, t] = -beta * kl[b, t]
                last = t
        if last is not None:
            rewards[b, last] += score[b]
    return rewards


def test_compute_rewards_puts_score_on_last_valid_token() -> None:
    torch.manual_seed(8)
    T = 6
    mask = right_padded_mask([T, 3, 0, 1, 5], T)  # a truncated row, an empty row, a one-token row
    score = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    kl = torch.randn(5, T)
    kl[mask == 0] = float("nan")  # padding may hold anything
    rewards, non_score_reward = compute_rewards(score, kl, mask, beta=0.1)
    assert torch.allclose(rewards, naive_rewards(score, kl, mask, 0.1))
    assert torch.allclose(non_score_reward, naive_rewards(torch.zeros(5), kl, mask, 0.1))
    assert rewards[2].abs().sum() == 0  # empty row: score dropped, no crash
    assert rewards[1, 2] == pytest.approx(2.0 - 0.1 * kl[1, 2].item())  # EOS position, not the first pad


# --- GAE -----------------------------------------------------------------------------------------------------------


def naive_gae(values: list[float], rewards: list[float], gamma: float, lam: float) -> list[float]:
    advantages, lastgaelam = [0.0] * len(values), 0.0
    for t in reversed(range(len(values))):
        nextvalue = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * nextvalue - values[t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[t] = lastgaelam
    return advantages


def test_gae_matches_naive_loop_on_random_right_padded_rows() -> None:
    torch.manual_seed(9)
    B, T, gamma, lam = 7, 9, 0.9, 0.8
    lengths = [9, 1, 0, 5, 8, 3, 9]
    mask = right_padded_mask(lengths, T)
    values, rewards = torch.randn(B, T), torch.randn(B, T)
    padded_values = torch.where(mask.bool(), values, 1e6)  # garbage beyond the end must not bootstrap
    advantages, returns = compute_gae(padded_values, rewards, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = naive_gae(values[b, :n].tolist(), rewards[b, :n].tolist(), gamma, lam)
        assert torch.allclose(advantages[b, :n], torch.tensor(expected), atol=1e-5)
        assert torch.allclose(returns[b, :n], torch.tensor(expected) + values[b, :n], atol=1e-5)
        assert (advantages[b, n:] == 0).all() and (returns[b, n:] == 0).all()


def test_gae_hand_computed_three_steps() -> None:
    # gamma = 0.9, lam = 0.5, V = [1, 2, 3], r = [0, 0, 1], then one padded position holding V = 100:
    # delta_2 = 1 + 0 - 3 = -2                 A_2 = -2
    # delta_1 = 0 + 0.9 * 3 - 2 = 0.7          A_1 = 0.7 + 0.45 * -2 = -0.2
    # delta_0 = 0 + 0.9 * 2 - 1 = 0.8          A_0 = 0.8 + 0.45 * -0.2 = 0.71
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(values, rewards, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[0.71, -0.2, -2.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[1.71, 1.8, 1.0, 0.0]]))


# --- PPO losses ----------------------------------------------------------------------------------------------------


def test_policy_loss_ratio_one_is_minus_mean_advantage() -> None:
    torch.manual_seed(10)
    logprobs = torch.randn(3, 5)
    advantages = torch.randn(3, 5)
    mask = right_padded_mask([5, 2, 4], 5)
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_range=0.2)
    assert torch.allclose(loss, -masked_mean(advantages, mask))
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0 and stats["ratio_mean"] == 1


def test_policy_loss_hand_computed_clipping() -> None:
    # eps = 0.2.  A, ratio -> pg_losses, pg_losses2 -> max
    #  1, 1.5 -> -1.5, -1.2 -> -1.2 (clipped)     -1, 0.5 ->  0.5,  0.8 ->  0.8 (clipped)
    #  2, 0.5 -> -1.0, -1.6 -> -1.0               -1, 1.5 ->  1.5,  1.2 ->  1.5
    # mean = (-1.2 + 0.8 - 1.0 + 1.5) / 4 = 0.025; clipfrac = 2 / 4. The 5th token is padding.
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 50.0]])
    advantages = torch.tensor([[1.0, -1.0, 2.0, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    logprobs = ratio.log().requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(1, 5), advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.025, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    grad = logprobs.grad[0]
    assert grad[0] == 0 and grad[1] == 0 and grad[4] == 0  # clipped and padded tokens push nothing
    assert grad[2] != 0 and grad[3] != 0


def test_value_loss_hand_computed_clipping() -> None:
    # c = 0.2, V_old = 0.
    #  V = 1.0, R = 0: vpredclipped = 0.2, vf_losses1 = 1,    vf_losses2 = 0.04 -> 1
    #  V = 1.0, R = 2: vpredclipped = 0.2, vf_losses1 = 1,    vf_losses2 = 3.24 -> 3.24 (clipped)
    #  V = 0.1, R = 1: vpredclipped = 0.1, vf_losses1 = 0.81, vf_losses2 = 0.81 -> 0.81
    # loss = 0.5 * (1 + 3.24 + 0.81) / 3; vf_clipfrac = 1 / 3. The 4th token is padding.
    values = torch.tensor([[1.0, 1.0, 0.1, 7.0]])
    returns = torch.tensor([[0.0, 2.0, 1.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo_value_loss(values, torch.zeros(1, 4), returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 5.05 / 3, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


def test_value_loss_clips_around_the_old_value_not_zero() -> None:
    # c = 0.2, V_old = 5 (so a clip around 0 would give different numbers):
    #  V = 6.0, R = 5: vpredclipped = 5.2, vf_losses1 = 1,    vf_losses2 = 0.04 -> 1
    #  V = 6.0, R = 7: vpredclipped = 5.2, vf_losses1 = 1,    vf_losses2 = 3.24 -> 3.24 (clipped)
    #  V = 4.9, R = 4: vpredclipped = 4.9, vf_losses1 = 0.81, vf_losses2 = 0.81 -> 0.81
    values = torch.tensor([[6.0, 6.0, 4.9]])
    returns = torch.tensor([[5.0, 7.0, 4.0]])
    loss, stats = ppo_value_loss(
        values, torch.full((1, 3), 5.0), returns, torch.ones(1, 3), clip_range_value=0.2
    )
    assert loss.item() == pytest.approx(0.5 * 5.05 / 3, abs=1e-5)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


# --- Bradley-Terry -------------------------------------------------------------------------------------------------


def test_bradley_terry_plain_margin_and_weights() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid(x)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((sp(2) + sp(0)) / 2)
    margin = torch.tensor([1.0, 0.0])
    assert bradley_terry_loss(chosen, rejected, margin=margin).item() == pytest.approx((sp(1) + sp(0)) / 2)
    weights = torch.tensor([1.0, 3.0])
    got = bradley_terry_loss(chosen, rejected, margin=margin, weights=weights).item()
    assert got == pytest.approx((sp(1) + 3 * sp(0)) / 4)


def test_bradley_terry_label_smoothing_mixes_in_the_flipped_label() -> None:
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0])
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid(x)
    got = bradley_terry_loss(chosen, rejected, label_smoothing=0.1).item()
    assert got == pytest.approx((0.9 * sp(2) + 0.1 * sp(-2) + 0.9 * sp(-1) + 0.1 * sp(1)) / 2)
    # The smoothed loss stops pushing at the gap log(0.9 / 0.1): its gradient there is zero.
    gap = torch.tensor([math.log(9.0)], requires_grad=True)
    bradley_terry_loss(gap, torch.zeros(1), label_smoothing=0.1).backward()
    assert abs(gap.grad.item()) < 1e-6


def test_bradley_terry_k_way_groups_average_over_groups() -> None:
    # group A: K = 3 ranked answers -> 3 pairs of weight 1/3; group B: one pair of weight 1.
    chosen = torch.tensor([1.0, 1.0, 0.0, 3.0])
    rejected = torch.tensor([0.0, -1.0, -1.0, 0.0])
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731
    group_a = (sp(1) + sp(2) + sp(1)) / 3
    expected = (group_a + sp(3)) / 2
    assert bradley_terry_loss(chosen, rejected, weights=weights).item() == pytest.approx(expected, rel=1e-6)


# --- KL controllers ------------------------------------------------------------------------------------------------


def test_fixed_kl_controller_does_not_move() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_direction_clipping_and_resume() -> None:
    up = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    up.update(current_kl=12.0, n_steps=100)  # error = clip(1.0) = 0.2
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    down = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    down.update(current_kl=5.4, n_steps=100)  # error = -0.1, inside the clip
    assert down.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    far_below = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    far_below.update(current_kl=0.6, n_steps=100)  # error = clip(-0.9) = -0.2
    assert far_below.value == pytest.approx(0.1 * (1 - 0.2 * 100 / 10000))

    resumed = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(up.state_dict())
    for kl in (3.0, 9.0, 7.5):
        up.update(kl, 64)
        resumed.update(kl, 64)
    assert resumed.value == up.value


def test_adaptive_kl_controller_keeps_beta_through_a_non_finite_kl() -> None:
    # A skipped (non-finite) rollout measures no KL; beta must come out of it as it went in, and keep moving after.
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    for bad in (float("nan"), float("inf"), float("-inf")):
        ctl.update(bad, 64)
        assert ctl.value == 0.1
    ctl.update(12.0, 100)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))


def test_adaptive_kl_controller_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        AdaptiveKLController(init_beta=0.1, target=0.0, horizon=10000)

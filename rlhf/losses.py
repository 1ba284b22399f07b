"""The tensor math of RLHF: masked statistics, log-probs, KL estimators, rewards, GAE, PPO and Bradley-Terry losses.

Torch only (no accelerate, deepspeed or transformers), so tests import it directly. Names follow CleanRL and
openai/lm-human-preferences (`ratio`, `pg_losses`, `pg_losses2`, `vf_losses1`, `vpredclipped`, `lastgaelam`, ...).

Shapes: B = batch (sequences), T = response tokens, V = vocabulary. `mask` is [B, T], float or bool, binary:
1 marks a real response token, 0 padding. Masked functions select with `torch.where` rather than multiplying, so
inf/NaN left in padded positions (e.g. log-probs of pad tokens) never leaks into a result.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# Whitening a handful of numbers is noise; the lm-human-preferences reference code refuses to whiten below 8 samples.
MIN_WHITEN_ELEMENTS = 8

KLEstimator = Literal["k1", "k2", "k3", "abs"]


# --- masked statistics -------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i over positions where mask_i = 1; over all dims (scalar) or along `dim`."""
    return torch.where(mask.bool(), x, 0).sum(dim=dim)


def masked_mean(
    x: Tensor, mask: Tensor, dim: int | None = None, normaliser: float | Tensor | None = None
) -> Tensor:
    """sum(x * mask) / sum(mask); an all-masked slice gives 0, not NaN.

    `normaliser` replaces the denominator. Use it under gradient accumulation: averaging per-micro-batch token
    means is not the token mean of the optimizer step when micro-batches hold different numbers of tokens, so pass
    the step's total valid-token count and the micro-batch losses then *sum* to the global token mean (mind how the
    loop scales losses: accelerate's `backward` divides by the accumulation steps, DDP averages over processes).
    """
    if normaliser is not None:
        return masked_sum(x, mask, dim) / normaliser
    return masked_sum(x, mask, dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of x (scalar), Bessel-corrected when `unbiased`, like `torch.var`.

    Raises ValueError when there are no valid entries, or only one and `unbiased` (the variance is undefined).
    """
    n = mask.sum()
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid entries, got {int(n)}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid entries of the whole batch; exactly 0 on masked positions.

    shift_mean=False adds the mean back (only rescales): rewards keep their sign, as in lm-human-preferences.
    With fewer than MIN_WHITEN_ELEMENTS valid entries, x is returned unchanged (neither centred nor scaled), still
    zeroed on masked positions: the statistics of a few numbers are noise.
    """
    valid = mask.bool()
    if valid.sum() < MIN_WHITEN_ELEMENTS:
        return torch.where(valid, x, 0)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, 0)


# --- log-probabilities and entropy ---------------------------------------------------------------------------------


# Tokens per chunk in the selective functions: a [chunk, V] float32 block (V = 150k: 600 MB at 1024 tokens) is the
# largest temporary they make, whatever the number of tokens.
LOGPROB_CHUNK_TOKENS = 1024


def _token_chunks(logits: Tensor, temperature: float, chunk_tokens: int):
    """Yield [n, V] blocks of logits [..., V] flattened over the leading dims, upcast to >= float32 and divided by
    the temperature one block at a time (so no full-size scaled copy of the logits exists at once)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    for block in logits.reshape(-1, logits.shape[-1]).split(chunk_tokens):
        block = block.to(dtype)
        yield block / temperature if temperature != 1.0 else block


def selective_log_softmax(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_tokens: int = LOGPROB_CHUNK_TOKENS
) -> Tensor:
    """log softmax(z / temperature)[label] per token, without a full-vocabulary log-softmax: for each block of
    `chunk_tokens` tokens, z_label / tau - logsumexp(z / tau). logits [..., V], labels [...] -> [...], >= float32.

    Any leading shape: [B, T, V] padded or [N, V] packed. Callers align logits with labels (logits at t predict
    token t). Equal to `log_softmax(logits / temperature).gather(labels)` up to float error.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    blocks = _token_chunks(logits, temperature, chunk_tokens)
    out = [
        block.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(block, dim=-1)
        for block, index in zip(blocks, labels.reshape(-1).split(chunk_tokens), strict=True)
    ]
    return torch.cat(out).reshape(labels.shape) if out else logits.new_zeros(labels.shape, dtype=dtype)


def chunked_entropy(
    logits: Tensor, temperature: float = 1.0, chunk_tokens: int = LOGPROB_CHUNK_TOKENS
) -> Tensor:
    """Entropy of softmax(z / temperature) per token, block by block as in `selective_log_softmax`.
    logits [..., V] -> [...], >= float32. Equal to the entropy of `softmax(logits / temperature)` up to float error."""
    out = [
        torch.logsumexp(block, -1) - (torch.softmax(block, -1) * block).sum(-1)
        for block in _token_chunks(logits, temperature, chunk_tokens)
    ]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return (
        torch.cat(out).reshape(logits.shape[:-1]) if out else logits.new_zeros(logits.shape[:-1], dtype=dtype)
    )


# --- KL penalty and per-token rewards -----------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi. [B, T] -> [B, T].

    With log r = log q - log p (q = pi_ref, p = pi), see Schulman, "Approximating KL divergence" (2020):
      k1  = -log r = log p - log q       unbiased, high variance, can be negative per token
      k2  = 0.5 (log r)^2                biased, low variance, >= 0
      k3  = (r - 1) - log r              unbiased, low variance, >= 0 (0 iff p = q)
      abs = |log p - log q|
    """
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr**2
    if estimator == "k3":
        return torch.expm1(logr) - logr  # expm1 = r - 1, exact near r = 1
    if estimator == "abs":
        return logr.abs()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of k1, k2, k3, abs")


@torch.no_grad()
def compute_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards r_t = -beta * kl_t + score * [t = last valid token] (InstructGPT eq. 2, per token).

    score [B] (one scalar per sequence, from the reward model), kl [B, T], mask [B, T]
    -> (rewards [B, T], non_score_reward [B, T]), both 0 on masked positions.
    The score lands on the last valid token: the EOS, or the last sampled token of a truncated answer (never the
    first pad, cf. trl#3750). A row without valid tokens gets no score (dropped, nothing to attach it to).
    """
    valid = mask.bool()
    non_score_reward = torch.where(valid, -beta * kl, 0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(valid, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]; -1 for an empty row
    is_last = positions == last  # [B, T]; all False in an empty row
    rewards = non_score_reward + torch.where(is_last, score.unsqueeze(1).to(non_score_reward.dtype), 0)
    return rewards, non_score_reward


# --- generalised advantage estimation ----------------------------------------------------------------------------


@torch.no_grad()
def compute_gae(
    values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), one time step per response token.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}        (lastgaelam)
        R_t     = A_t + V_t                               (the value target)

    values, rewards, mask: [B, T] -> (advantages [B, T], returns [B, T]) in float32, 0 on masked positions.
    The episode ends at the last valid token: V and A beyond it are 0 (bootstrap 0). Masked positions are skipped,
    i.e. the recursion runs over valid tokens only, so whatever the padding holds never enters the result.
    """
    values, rewards, valid = values.float(), rewards.float(), mask.bool()
    lastgaelam = torch.zeros_like(values[:, 0])  # A_{t+1} of the next valid token, [B]
    nextvalues = torch.zeros_like(values[:, 0])  # V_{t+1} of the next valid token, [B]
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        gae = delta + gamma * lam * lastgaelam
        # On a masked position carry A_{t+1}, V_{t+1} through unchanged, as if the position did not exist.
        lastgaelam = torch.where(valid[:, t], gae, lastgaelam)
        nextvalues = torch.where(valid[:, t], values[:, t], nextvalues)
        advantages[:, t] = torch.where(valid[:, t], gae, 0)
    returns = torch.where(valid, advantages + values, 0)
    return advantages, returns


# --- PPO losses ----------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    normaliser: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = exp(logp - logp_old)
        L     = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    All inputs [B, T]; `normaliser` as in `masked_mean`. Returns (loss [], stats) with detached scalar stats:
    clipfrac (fraction of tokens where the clipped term is the larger), approx_kl (mean 0.5 (logratio)^2 = k2,
    as lm-human-preferences and TRL log it, so thresholds carry over), ratio_mean.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask, normaliser=normaliser)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "approx_kl": masked_mean(0.5 * logratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return pg_loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
    normaliser: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (lm-human-preferences / CleanRL):

        vpredclipped = V_old + clip(V - V_old, -c, c)
        L_V          = 0.5 * mean_t max((V - R)^2, (vpredclipped - R)^2)

    All inputs [B, T]; `normaliser` as in `masked_mean`. The max is pessimistic: a value that moved more than c
    from the rollout's value gets no gradient when moving it back would help. Stats: vf_clipfrac (detached).
    """
    vpredclipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask, normaliser=normaliser)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask)}
    return vf_loss, stats


# --- reward model ---------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | None = None,
    weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Pairwise Bradley-Terry loss l_i = -log sigmoid(s_chosen - s_rejected - margin), averaged as sum(w l) / sum(w).

    All inputs [N] (one entry per pair). `margin` (Llama 2): the required score gap. `weights`: for InstructGPT's
    K-way rankings give each of a group's K(K-1)/2 pairs the weight 1 / (K(K-1)/2); sum(w) is then the number of
    groups and the loss is the mean over groups of each group's mean pair loss. Without weights: the plain mean.
    `label_smoothing` eps treats each label as flipped with probability eps (human preferences are noisy):
    l_i = -(1 - eps) log sigmoid(d_i) - eps log sigmoid(-d_i), whose minimum is at a finite gap, log((1-eps)/eps).
    """
    logits = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        logits = logits - margin
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    if weights is None:
        return losses.mean()
    return (weights * losses).sum() / weights.sum()


# --- KL coefficient controllers (plain Python; their state is one float) ----------------------------------------


class FixedKLController:
    """beta stays at its initial value. `.value` is the current beta."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; the same signature as AdaptiveKLController.update so the PPO loop need not know which it has."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller for beta (Ziegler et al. 2019, "Fine-tuning language models from human preferences"):

        e_t  = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + e_t * n_steps / horizon)

    beta rises while the measured KL is above target and falls while below. n_steps is the number of episodes
    (sequences) the KL was measured on, so `horizon` is in episodes as in lm-human-preferences.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        super().__init__(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return  # a NaN measures nothing (the rollout was skipped); min/max would pass it on to beta for good
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

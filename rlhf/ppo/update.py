"""One PPO update, as numbered steps: the run's state and what it does with one rollout.

1. generate      sample answers for `rollout_batch_size` prompts (KV cache, left-padded prompts)
2. score         each reward source on the decoded text, combined by weight; missing-EOS penalty
3. logprobs      policy (old), reference and values, no grad
4. rewards       r_t = -beta * KL_t, plus the score on the last token
5. advantages    GAE over response tokens, whitened
6. PPO epochs    clipped policy + value losses over minibatches, gradient accumulation over micro-batches
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.distributed import gathered_for_generation, mean_over_ranks
from rlhf.losses import (
    FixedKLController,
    compute_gae,
    compute_rewards,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf.ppo.config import PPOStageConfig
from rlhf.rewards import combine_rewards
from rlhf.rollout import (
    PolicyAndValue,
    Rollout,
    cut_after_eos,
    generate,
    left_pad,
    pad_batch,
    policy_forward,
    reference_of,
)

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row, or non-finite weights about to be saved."""


@dataclass
class PromptSet:
    """Prompts tokenised once; the order of each pass is a seeded permutation, so a position is two integers."""

    ids: list[list[int]]
    rows: list[dict[str, Any]]

    def batch(self, update: int, size: int, seed: int, rank: int, world: int) -> list[int]:
        per_pass = max(1, len(self.ids) // (size * world))
        epoch, step = divmod(update, per_pass)
        order = torch.randperm(len(self.ids), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        start = (step * world + rank) * size
        return order[start : start + size]


@dataclass
class TokenWeightedMeans:
    """Statistics of micro-batches averaged with each micro-batch weighted by its response tokens, as the loss is."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tokens: float = 0.0

    def add(self, stats: dict[str, float], tokens: float) -> None:
        for key, value in stats.items():
            self.sums[key] += value * tokens
        self.tokens += tokens

    def merge(self, other: TokenWeightedMeans) -> None:
        for key, value in other.sums.items():
            self.sums[key] += value
        self.tokens += other.tokens

    def means(self) -> dict[str, float]:
        return {key: value / max(self.tokens, 1e-9) for key, value in self.sums.items()}


@dataclass
class PPORun:
    """State of a PPO run; everything here is saved in a checkpoint."""

    config: PPOStageConfig
    accelerator: Any
    tokenizer: Any
    model: PolicyAndValue
    reference: Any
    optimizer: Any
    scheduler: Any
    kl_ctl: FixedKLController
    sources: dict[str, tuple[Any, float]]
    prompts: PromptSet
    ptx: list[dict] | None = None
    # Draws the PPO-ptx demonstrations, a fresh sample per micro-batch; its state is checkpointed per rank.
    ptx_generator: torch.Generator = field(default_factory=torch.Generator)
    update: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    ema: dict[str, torch.Tensor] | None = None
    # Each update's statistics and the run's seconds so far (earlier processes included): a resumed run reports all.
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self):
        return self.accelerator.unwrap_model(self.model).value

    def rollout(self, timings: dict[str, float]) -> tuple[Rollout, dict[str, Any], list[str], list[str]]:
        config, tok, device = self.config, self.tokenizer, self.accelerator.device
        index = self.prompts.batch(
            self.update,
            config.rollout_batch_size,
            config.seed,
            self.accelerator.process_index,
            self.accelerator.num_processes,
        )
        rows = [self.prompts.rows[i] for i in index]
        query_ids, query_mask = left_pad([self.prompts.ids[i] for i in index], tok.pad_token_id)
        query_ids, query_mask = query_ids.to(device), query_mask.to(device)

        # 1. generate
        start = time.perf_counter()
        self.model.eval()
        # The unwrapped policy and the reference run outside the prepared model's autocast: under mixed precision
        # they take it here, so that sampling, the reference and the scoring passes share one precision (else the
        # first update's KL is not 0 and the ratio is taken against a distribution nobody sampled from).
        with gathered_for_generation(self.accelerator, self.model), self.accelerator.autocast():
            raw = generate(self.policy, query_ids, query_mask, tok, config)
        response_ids, response_mask, has_eos = cut_after_eos(raw, tok.eos_token_id, tok.pad_token_id)
        batch = Rollout(query_ids, query_mask, response_ids, response_mask, has_eos)
        timings["generate"] = time.perf_counter() - start

        # 2. score
        start = time.perf_counter()
        completions = tok.batch_decode(response_ids, skip_special_tokens=True)
        prompts = [row["prompt"][-1]["content"] for row in rows]
        total, per_source = combine_rewards(
            self.sources,
            prompts,
            completions,
            prompt_messages=[row["prompt"] for row in rows],
            categories=[row.get("category") for row in rows],
            finished=has_eos.tolist(),
        )
        batch.scores = self.penalise_missing_eos(total.to(device), has_eos)
        timings["score"] = time.perf_counter() - start

        # 3. logprobs (policy, reference) and values, no grad; same micro-batches as training
        start = time.perf_counter()
        with torch.no_grad():
            batch.logprobs, batch.values = self.forward_in_chunks(batch)
            with reference_of(self.policy, self.reference) as reference, self.accelerator.autocast():
                batch.ref_logprobs = torch.cat(
                    [
                        policy_forward(reference, batch.select(chunk), config.temperature)[0]
                        for chunk in self.chunks(len(completions))
                    ]
                )
        # 4. KL-penalised rewards
        kl = kl_penalty(batch.logprobs, batch.ref_logprobs, config.kl_estimator)
        rewards, non_score_reward = compute_rewards(batch.scores, kl, response_mask, self.kl_ctl.value)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, response_mask, shift_mean=False)
        # 5. advantages
        batch.advantages, batch.returns = compute_gae(
            batch.values, rewards, response_mask, config.gamma, config.lam
        )
        if config.whiten_advantages:
            batch.advantages = masked_whiten(batch.advantages, response_mask)
        timings["logprobs"] = time.perf_counter() - start

        mask = response_mask.float()
        stats = {
            "reward/total": batch.scores.mean().item(),
            **{f"reward/{name}": scores.mean().item() for name, scores in per_source.items()},
            "objective/kl": (kl * mask).sum(1).mean().item(),
            "objective/kl_k3": (kl_penalty(batch.logprobs, batch.ref_logprobs, "k3") * mask)
            .sum(1)
            .mean()
            .item(),
            "objective/non_score_reward": (non_score_reward * mask).sum(1).mean().item(),
            "objective/beta": self.kl_ctl.value,
            "response/length": mask.sum(1).mean().item(),
            "response/eos_rate": has_eos.float().mean().item(),
        }
        return batch, stats, prompts, completions

    def chunks(self, n: int) -> list[torch.Tensor]:
        return list(torch.arange(n).split(self.config.micro_batch_size))

    def forward_in_chunks(self, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [
            self.model(batch.select(chunk), self.config.temperature, entropy="none")
            for chunk in self.chunks(len(batch.has_eos))
        ]
        return torch.cat([o[0] for o in outputs]), torch.cat([o[2] for o in outputs])

    def penalise_missing_eos(self, scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """An answer that never stopped gets the penalty instead of (replace) or on top of (subtract) its score.
        The penalty's size counts, not its sign (-1 and TRL's 1.0 both penalise): a truncated answer never scores
        above the penalty's negative in replace mode."""
        if self.config.missing_eos_penalty is None:
            return scores
        penalty = abs(self.config.missing_eos_penalty)
        if self.config.missing_eos_mode == "replace":
            return torch.where(has_eos, scores, torch.full_like(scores, -penalty))
        return torch.where(has_eos, scores, scores - penalty)

    def train_on(self, batch: Rollout) -> dict[str, float]:
        """6. PPO epochs: minibatches of `mini_batch_size`, accumulated over micro-batches, one optimizer step each.

        Statistics are token-weighted means over every micro-batch of the update; the approx-KL early stop reads
        the epoch's mean, not whichever micro-batch came last."""
        config = self.config
        self.model.train()
        totals, skipped, stopped = TokenWeightedMeans(), 0, 0
        generator = torch.Generator().manual_seed(config.seed * 1000003 + self.update)
        for _ in range(config.ppo_epochs):
            epoch = TokenWeightedMeans()
            order = torch.randperm(len(batch.has_eos), generator=generator)
            for minibatch in order.split(config.mini_batch_size):
                step = self.optimizer_step(batch, minibatch)
                if step is None:
                    skipped += 1
                else:
                    epoch.merge(step)
            totals.merge(epoch)
            # Every rank must stop at the same epoch (each backward is a collective): the mean over ranks decides.
            if (
                config.approx_kl_stop
                and mean_over_ranks(epoch.means().get("policy/approx_kl", 0.0)) > config.approx_kl_stop
            ):
                stopped = 1
                break
        self.scheduler.step()
        return {
            **totals.means(),
            "policy/early_stops": float(stopped),
            "loss/nonfinite_steps": float(skipped),
        }

    def optimizer_step(self, batch: Rollout, minibatch: torch.Tensor) -> TokenWeightedMeans | None:
        """One optimizer step over `minibatch`; its statistics, or None when a non-finite loss skipped it."""
        config, accelerator = self.config, self.accelerator
        # The token mean over every rank's minibatch: DDP and DeepSpeed average the gradients over ranks, so each
        # rank divides its token sum by the tokens of all ranks over their number. Its own count would weight the
        # tokens of a rank with short answers above those of a rank with long ones.
        tokens = mean_over_ranks(float(batch.response_mask[minibatch].sum())) or 1.0
        stats, losses = TokenWeightedMeans(), []
        # Grouped by answer length, so a micro-batch's forward (trimmed to its longest sequence) carries little
        # padding; the gradient is the same, the losses being normalised by the minibatch's token count.
        by_length = minibatch[batch.response_mask[minibatch].sum(1).argsort(stable=True)]
        micro_batches = by_length.split(config.micro_batch_size)
        entropy_mode = "loss" if config.entropy_coef else "stat"
        for micro in micro_batches:
            mb = batch.select(micro)
            with accelerator.accumulate(self.model):
                logprobs, entropy, values = self.model(mb, config.temperature, entropy_mode)
                # Normalise by the step's token count: the sum over micro-batches and ranks is the token mean.
                pg_loss, pg_stats = ppo_policy_loss(
                    logprobs, mb.logprobs, mb.advantages, mb.response_mask, config.cliprange, tokens
                )
                vf_loss, vf_stats = ppo_value_loss(
                    values, mb.values, mb.returns, mb.response_mask, config.cliprange_value, tokens
                )
                entropy_sum = masked_mean(entropy, mb.response_mask, normaliser=tokens)
                loss = pg_loss + config.vf_coef * vf_loss - config.entropy_coef * entropy_sum
                if config.ptx_coef > 0:
                    loss = loss + config.ptx_coef * self.ptx_loss() / len(micro_batches)
                losses.append(loss.detach())
                # accelerate divides by the accumulation steps; undo it, our normaliser already made this a sum.
                accelerator.backward(loss * config.gradient_accumulation_steps)
            micro_tokens = float(mb.response_mask.sum())
            # Per-token means of this micro-batch (the losses were divided by the minibatch's count, not its own).
            share = float(tokens) / max(micro_tokens, 1.0)
            stats.add(
                {
                    **{f"policy/{k}": float(v) for k, v in pg_stats.items()},
                    "value/clipfrac": float(vf_stats["vf_clipfrac"]),
                    "policy/entropy": float(entropy_sum.detach()) * share,
                    "loss/policy": float(pg_loss.detach()) * share,
                    "loss/value": float(vf_loss.detach()) * share,
                },
                micro_tokens,
            )
        # Under DeepSpeed the engine has already clipped and stepped inside the last `backward` (it skips a step
        # whose gradient norm is not finite); the clip, step and zero_grad calls below are then no-ops.
        # A NaN loss on one rank has made the all-reduced gradient NaN on every rank: all of them must skip.
        if not math.isfinite(mean_over_ranks(float(torch.stack(losses).sum()))):
            self.skip_nonfinite_step()
            return None
        self.nonfinite_in_a_row = 0
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.update_ema()
        return stats

    def skip_nonfinite_step(self) -> None:
        self.optimizer.zero_grad()
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        log.warning(
            "non-finite loss at update %d: step skipped (%d in a row)", self.update, self.nonfinite_in_a_row
        )
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            raise TrainingAborted(
                f"update {self.update}: {self.nonfinite_in_a_row} non-finite losses in a row (max_nonfinite_steps); aborting"
            )

    def ptx_rows(self) -> list[dict]:
        """A fresh draw of demonstrations for each micro-batch (without replacement within the draw)."""
        n = min(self.config.micro_batch_size, len(self.ptx))
        return [self.ptx[i] for i in torch.randperm(len(self.ptx), generator=self.ptx_generator)[:n].tolist()]

    def ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: next-token loss on a micro-batch of demonstrations (InstructGPT eq. 2's pretraining term)."""
        rows = self.ptx_rows()
        ids, mask = pad_batch([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
        labels, _ = pad_batch([r["labels"] for r in rows], -100)
        device = self.accelerator.device
        with self.accelerator.autocast():
            return self.policy(
                input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
            ).loss

    def update_ema(self) -> None:
        if self.config.ema_decay is None:
            return
        params = {k: v.detach() for k, v in self.policy.state_dict().items()}
        if self.ema is None:
            self.ema = {k: v.clone().float().cpu() for k, v in params.items()}
            return
        for key, value in params.items():
            self.ema[key].mul_(self.config.ema_decay).add_(
                value.float().cpu(), alpha=1 - self.config.ema_decay
            )

"""Stage 3: PPO against the reward sources, with a per-token KL penalty to the frozen SFT reference.

    accelerate launch -m rlhf.ppo --config configs/tiny/ppo.yaml

Our own loop on accelerate (TRL no longer ships PPO), following InstructGPT and "The N+ Implementation Details
of RLHF with PPO" (Huang et al., 2024). One update:

    1. generate      sample answers for `rollout_batch_size` prompts (KV cache, left-padded prompts)
    2. score         each reward source on the decoded text, combined by weight; missing-EOS penalty
    3. logprobs      policy (old), reference and values, no grad
    4. rewards       r_t = -beta * KL_t, plus the score on the last token
    5. advantages    GAE over response tokens, whitened
    6. PPO epochs    clipped policy + value losses over minibatches, gradient accumulation over micro-batches

Batch sizes, per process: `rollout_batch_size` prompts per update; `mini_batch_size` samples per optimizer step;
`micro_batch_size` samples per forward/backward. Gradient accumulation = mini / micro, derived.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf.checkpoint import (
    ResumeError,
    atomic_directory,
    begin_stage_output,
    read_manifest,
    resolve_resume,
    rotate_checkpoints,
    stage_manifest,
    write_manifest,
)
from rlhf.config import config_to_dict, dump_config, parse_config
from rlhf.data import (
    Report,
    content_hash,
    load_demonstrations,
    load_prompts,
    render_prompt,
    tokenize_demonstrations,
)
from rlhf.losses import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf.models import LoraSettings, disable_dropout, load_causal_lm, load_scalar_model, load_tokenizer
from rlhf.rewards import RewardModelScorer, combine_rewards, load_function
from rlhf.rollout import (
    PolicyAndValue,
    Rollout,
    cut_after_eos,
    generate,
    left_pad,
    policy_forward,
    reference_of,
)

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class PPOStageConfig:
    """PPO stage. Defaults follow the N+ implementation details (TL;DR) unless noted."""

    # models
    policy_model: str = field(
        default="", metadata={"help": "SFT checkpoint: the policy's start and the reference."}
    )
    reference_model: str = field(
        default="", metadata={"help": "Frozen reference; empty = policy_model (or the LoRA base)."}
    )
    reward_model: str = field(
        default="", metadata={"help": "Reward-stage output; empty = no learned reward model."}
    )
    value_init: str = field(
        default="reward", metadata={"help": "Value model start: 'reward' (the RM) or 'policy' (fresh head)."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code."})
    use_lora: bool = field(
        default=False, metadata={"help": "LoRA policy; the reference is the base with the adapter off."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    merge_lora: bool = field(
        default=True, metadata={"help": "Save the final LoRA policy merged into its base."}
    )
    # data and output
    train_data: list[str] = field(
        default_factory=list, metadata={"help": "Prompt files (prompt/messages, category)."}
    )
    output_dir: str = field(
        default="outputs/ppo", metadata={"help": "Where checkpoints and the final policy go."}
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts longer than this (tokens) are dropped, counted."}
    )
    # rewards
    reward_sources: list[str] = field(
        default_factory=lambda: ["reward_model"],
        metadata={
            "help": "'reward_model', 'safety', or 'module:function' callables (prompts, completions) -> scores."
        },
    )
    reward_weights: list[float] = field(
        default_factory=lambda: [1.0], metadata={"help": "One weight per source."}
    )
    safety_config: str = field(
        default="configs/safety/rules.yaml", metadata={"help": "Safety reward config (YAML)."}
    )
    reward_allowed_modules: list[str] = field(
        default_factory=lambda: ["rlhf."],
        metadata={"help": "Import prefixes a 'module:function' source may come from."},
    )
    reward_clip: float | None = field(default=None, metadata={"help": "Clip normalised RM scores to +-this."})
    missing_eos_penalty: float | None = field(
        default=-1.0, metadata={"help": "Score for answers without EOS (None = off)."}
    )
    missing_eos_mode: str = field(
        default="replace",
        metadata={"help": "'replace' the score (default, N+ details) or 'subtract' the penalty's magnitude."},
    )
    # sampling
    max_new_tokens: int = field(default=48, metadata={"help": "Response length limit."})
    always_full_length: bool = field(
        default=False, metadata={"help": "Sample max_new_tokens always (then cut at EOS)."}
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature; logits are divided by it in every pass."}
    )
    top_k: int = field(default=0, metadata={"help": "0 = off: keeps the sampled distribution the policy's."})
    top_p: float = field(default=1.0, metadata={"help": "1.0 = off."})
    # batch sizes (per process)
    rollout_batch_size: int = field(default=16, metadata={"help": "Prompts per PPO update."})
    mini_batch_size: int = field(default=16, metadata={"help": "Samples per optimizer step."})
    micro_batch_size: int = field(default=8, metadata={"help": "Samples per forward/backward."})
    # algorithm
    total_updates: int = field(default=100, metadata={"help": "PPO updates (rollout + epochs) to run."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    learning_rate: float = field(
        default=3e-6, metadata={"help": "AdamW learning rate, linearly annealed to 0."}
    )
    adam_eps: float = field(default=1e-5, metadata={"help": "AdamW epsilon."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    kl_coef: float = field(
        default=0.05, metadata={"help": "beta: per-token KL penalty coefficient (initial, if adaptive)."}
    )
    kl_estimator: str = field(
        default="k1", metadata={"help": "KL estimator in the reward: k1 (default) or k3."}
    )
    target_kl: float | None = field(
        default=None, metadata={"help": "Adaptive beta target (Ziegler et al.); None = fixed."}
    )
    kl_horizon: float = field(default=10000, metadata={"help": "Adaptive beta horizon (samples)."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus weight."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages per rollout."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    approx_kl_stop: float | None = field(
        default=None, metadata={"help": "Stop an update's epochs when approx KL exceeds this."}
    )
    ptx_coef: float = field(
        default=0.0, metadata={"help": "PPO-ptx: weight of the SFT loss on demonstrations."}
    )
    ptx_data: list[str] = field(default_factory=list, metadata={"help": "Demonstrations for PPO-ptx."})
    ema_decay: float | None = field(
        default=None, metadata={"help": "Keep an EMA of the policy (e.g. 0.992); saved to ema/."}
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Abort after this many non-finite losses in a row."}
    )
    # operations
    seed: int = field(
        default=0, metadata={"help": "Seed: data order (shared by ranks) and sampling (offset by rank)."}
    )
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N updates (and at the end)."})
    keep_last: int = field(default=2, metadata={"help": "Committed checkpoints to keep."})
    log_every: int = field(default=1, metadata={"help": "Log metrics every N updates."})
    sample_every: int = field(
        default=10, metadata={"help": "Write a table of sample completions every N updates."}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "Trackers: tensorboard, wandb, none."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'auto', a checkpoint path, or None."}
    )
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is present."})
    mixed_precision: str = field(
        default="no", metadata={"help": "accelerate mixed precision: no, bf16, fp16."}
    )

    def __post_init__(self):
        if not self.policy_model:
            raise ValueError("policy_model: required")
        if not self.train_data:
            raise ValueError("train_data: at least one prompt source is required")
        if len(self.reward_weights) != len(self.reward_sources):
            raise ValueError(
                f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_sources)} reward_sources"
            )
        if "reward_model" in self.reward_sources and not self.reward_model:
            raise ValueError("reward_model: required when reward_sources includes 'reward_model'")
        if self.rollout_batch_size % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ValueError(
                "batch sizes: rollout_batch_size must be a multiple of mini_batch_size, and that of micro_batch_size"
            )
        for name, allowed in (
            ("kl_estimator", ("k1", "k3")),
            ("value_init", ("reward", "policy")),
            ("missing_eos_mode", ("replace", "subtract")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, found {getattr(self, name)!r}")
        if self.value_init == "reward" and not self.reward_model:
            self.value_init = "policy"
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ptx_data: required when ptx_coef > 0")
        self.reference_model = self.reference_model or ("" if self.use_lora else self.policy_model)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.mini_batch_size // self.micro_batch_size


# --------------------------------------------------------------------------------------------------------------
# Set-up


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


def load_prompt_set(
    config: PPOStageConfig, tokenizer, rows: list[dict[str, Any]], report: Report
) -> tuple[PromptSet, dict[str, int]]:
    ids, kept = [], []
    for row in rows:
        encoded = tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        if len(encoded) > config.max_prompt_length:
            report.drop("prompt over max_prompt_length")
            continue
        ids.append(encoded)
        kept.append(row)
    if len(kept) < config.rollout_batch_size:
        raise ValueError(
            f"train_data: {len(kept)} usable prompts, fewer than rollout_batch_size {config.rollout_batch_size}"
        )
    return PromptSet(ids, kept), report.drops


def build_reward_sources(config: PPOStageConfig, device) -> dict[str, tuple[Any, float]]:
    sources = {}
    for name, weight in zip(config.reward_sources, config.reward_weights, strict=True):
        if name == "reward_model":
            sources[name] = (RewardModelScorer(config.reward_model, device, clip=config.reward_clip), weight)
        elif name == "safety":
            from rlhf.safety import SafetyReward

            sources[name] = (SafetyReward.from_yaml(config.safety_config), weight)
        else:
            sources[name] = (load_function(name, config.reward_allowed_modules), weight)
    return sources


def load_models(config: PPOStageConfig, tokenizer, frozen=None):
    """-> (policy, reference or None, value). `frozen`: a context the reference loads in (whole, see frozen_loading)."""
    lora = LoraSettings(config.lora_r, config.lora_alpha) if config.use_lora else None
    policy = load_causal_lm(config.policy_model, tokenizer, config.dtype, config.trust_remote_code, lora)
    reference = None
    if config.reference_model:
        with frozen or nullcontext():
            reference = load_causal_lm(
                config.reference_model, tokenizer, config.dtype, config.trust_remote_code
            ).eval()
        reference.requires_grad_(False)
    value_path = config.reward_model if config.value_init == "reward" else config.policy_model
    value = load_scalar_model(value_path, tokenizer, config.dtype, config.trust_remote_code)
    for model in (policy, reference, value):
        if model is not None:
            disable_dropout(model)
    return policy, reference, value


# --------------------------------------------------------------------------------------------------------------
# One update


@dataclass
class Trainer:
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
    update: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    ema: dict[str, torch.Tensor] | None = None

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
        with gathered_for_generation(self.accelerator, self.model):
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
        )
        batch.scores = self.penalise_missing_eos(total.to(device), has_eos)
        timings["score"] = time.perf_counter() - start

        # 3. logprobs (policy, reference) and values, no grad; same micro-batches as training
        start = time.perf_counter()
        with torch.no_grad():
            batch.logprobs, batch.values = self.forward_in_chunks(batch)
            with reference_of(self.policy, self.reference) as reference:
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
        seq_kl = (kl * mask).sum(1)
        stats = {
            "reward/total": batch.scores.mean().item(),
            **{f"reward/{name}": scores.mean().item() for name, scores in per_source.items()},
            "objective/kl": seq_kl.mean().item(),
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
            self.model(batch.select(chunk), self.config.temperature)
            for chunk in self.chunks(len(batch.has_eos))
        ]
        return torch.cat([o[0] for o in outputs]), torch.cat([o[2] for o in outputs])

    def penalise_missing_eos(self, scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """An answer that never stopped gets the penalty instead of (replace) or on top of (subtract) its score."""
        penalty = self.config.missing_eos_penalty
        if penalty is None:
            return scores
        if self.config.missing_eos_mode == "replace":
            return torch.where(has_eos, scores, torch.full_like(scores, penalty))
        return torch.where(has_eos, scores, scores - abs(penalty))

    def train_on(self, batch: Rollout) -> dict[str, float]:
        """6. PPO epochs: minibatches of `mini_batch_size`, accumulated over micro-batches, one optimizer step each."""
        config = self.config
        self.model.train()
        totals: dict[str, list[float]] = {}
        generator = torch.Generator().manual_seed(config.seed * 1000003 + self.update)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(batch.has_eos), generator=generator)
            for minibatch in order.split(config.mini_batch_size):
                tokens = batch.response_mask[minibatch].sum().clamp(min=1)
                step_stats = self.optimizer_step(batch, minibatch, tokens)
                for key, value in step_stats.items():
                    totals.setdefault(key, []).append(value)
            if config.approx_kl_stop and np.mean(totals["policy/approx_kl"][-1:]) > config.approx_kl_stop:
                totals.setdefault("policy/early_stops", []).append(1.0)
                break
        self.scheduler.step()
        return {key: float(np.mean(values)) for key, values in totals.items()}

    def optimizer_step(
        self, batch: Rollout, minibatch: torch.Tensor, tokens: torch.Tensor
    ) -> dict[str, float]:
        config, accelerator = self.config, self.accelerator
        stats: dict[str, float] = {}
        losses = []
        for micro in minibatch.split(config.micro_batch_size):
            mb = batch.select(micro)
            with accelerator.accumulate(self.model):
                logprobs, entropy, values = self.model(mb, config.temperature)
                # Normalise by the minibatch's token count: the sum over micro-batches is then the token mean.
                pg_loss, pg_stats = ppo_policy_loss(
                    logprobs, mb.logprobs, mb.advantages, mb.response_mask, config.cliprange, tokens
                )
                vf_loss, vf_stats = ppo_value_loss(
                    values, mb.values, mb.returns, mb.response_mask, config.cliprange_value, tokens
                )
                entropy_mean = masked_mean(entropy, mb.response_mask, normaliser=tokens)
                loss = pg_loss + config.vf_coef * vf_loss - config.entropy_coef * entropy_mean
                if config.ptx_coef > 0:
                    loss = loss + config.ptx_coef * self.ptx_loss() / len(
                        minibatch.split(config.micro_batch_size)
                    )
                losses.append(loss.detach())
                # accelerate divides by the accumulation steps; undo it, our normaliser already made this a sum.
                accelerator.backward(loss * config.gradient_accumulation_steps)
                for key, value in {**pg_stats, **vf_stats}.items():
                    stats[f"policy/{key}" if key != "vf_clipfrac" else "value/clipfrac"] = float(value)
                for key, value in (
                    ("policy/entropy", entropy_mean),
                    ("loss/policy", pg_loss),
                    ("loss/value", vf_loss),
                ):
                    stats[key] = stats.get(key, 0.0) + float(value.detach())
        total_loss = torch.stack(losses).sum()
        # Under DeepSpeed the engine has already clipped and stepped inside the last `backward` (it skips a step
        # whose gradient norm is not finite); the clip, step and zero_grad calls below are then no-ops.
        if not torch.isfinite(total_loss):
            self.skip_nonfinite_step()
            return {"loss/nonfinite_steps": 1.0}
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

    def ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: next-token loss on a micro-batch of demonstrations (InstructGPT eq. 2's pretraining term)."""
        rng = random.Random(self.config.seed + self.update * 7919 + len(self.ptx))
        rows = rng.sample(self.ptx, min(self.config.micro_batch_size, len(self.ptx)))
        ids, mask = pad_right([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
        labels, _ = pad_right([r["labels"] for r in rows], -100)
        device = self.accelerator.device
        return (
            self.accelerator.unwrap_model(self.model)
            .policy(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            .loss
        )

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


def pad_right(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    from rlhf.rewards import pad_batch

    return pad_batch(sequences, value, side="right")


@contextmanager
def gathered_for_generation(accelerator, model):
    """Under ZeRO-3, gather the policy's parameters once for the whole `generate` call, not per layer per token.

    Gathering alone is not enough: ZeRO-3's per-module hooks would still release each layer after its forward and
    gather it again for the next token (DeepSpeed#4354). So the hooks come off for the call and go back on after, as
    in TRL's `unwrap_model_for_generation`. Costs the whole policy's memory on every rank meanwhile.
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    offload = model.optimizer.parameter_offload  # owns the engine's per-module fetch/release hooks
    policy = accelerator.unwrap_model(model).policy
    with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None):
        for param in model.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            # Hooks back on (this also invalidates the prefetch trace).
            offload._register_deepspeed_module(offload.module)


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed: the few places where a ZeRO launch differs from DDP


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed launch; None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


def device_options(config: PPOStageConfig) -> dict[str, Any]:
    """Accelerator arguments for the device. Under DeepSpeed, `cpu=True` would silently fall back to plain DDP, and a
    CPU-only machine has no default process-group backend: ask for gloo there (DeepSpeed picks its CPU accelerator)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return {"cpu": config.use_cpu}
    if torch.cuda.is_available():
        if config.use_cpu:
            raise ValueError("use_cpu: a DeepSpeed launch runs on the GPU it finds; pass --use_cpu false")
        return {}
    from accelerate.utils import InitProcessGroupKwargs

    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def configure_deepspeed(accelerator, config: PPOStageConfig) -> None:
    """DeepSpeed sizes its batches from a dataloader, and we have none: give it ours (per process) and our clipping.

    The engine then runs backward, clipping and the optimizer step inside `accelerator.backward` at the end of each
    minibatch (it divides the loss by the accumulation steps, as accelerate does without DeepSpeed).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    if plugin.zero_stage == 3 and (config.use_lora or config.ema_decay is not None):
        raise ValueError(
            "use_lora, ema_decay: not supported with PPO under ZeRO-3 (they need whole weights every step); use ZeRO-2"
        )
    wanted = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.mini_batch_size * accelerator.num_processes,
        "gradient_clipping": config.max_grad_norm,
        # Our torch AdamW, wrapped in ZeRO's optimizer; DeepSpeed vouches only for its own optimizers.
        "zero_allow_untested_optimizer": True,
    }
    ds_config = plugin.deepspeed_config
    if plugin.zero_stage == 3:
        # Checkpoints and the final save gather the shards into whole weights (accelerator.get_state_dict).
        ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    for key, value in wanted.items():
        if ds_config.get(key, "auto") not in ("auto", value):
            raise ValueError(
                f"DeepSpeed config: {key} = {ds_config[key]!r}, but the PPO config implies {value!r}; set it to 'auto'"
            )
        ds_config[key] = value


@contextmanager
def frozen_loading(accelerator):
    """Context to load the frozen models (reference, reward model) in: they run in inference mode, whole on every
    rank. Under ZeRO-3 that means outside DeepSpeed's partitioned init (`from_pretrained` follows transformers'
    global DeepSpeed config), which would shard them with no engine to gather the shards back. (accelerate's
    `zero3_init_context_manager(enable=False)` re-registers the same ZeRO-3 config, so it does not do this.)"""
    dschf = getattr(getattr(accelerator.state, "deepspeed_plugin", None), "dschf", None)
    if dschf is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(dschf)


def full_weights(trainer: Trainer) -> dict[str, dict[str, torch.Tensor] | None]:
    """Under ZeRO-3: the policy's and the value model's whole weights, gathered from the shards onto the main process
    (a collective: every rank calls it; the other ranks get nothing). Otherwise None: the modules hold them whole."""
    parts: dict[str, dict[str, torch.Tensor] | None] = {"policy": None, "value": None}
    if zero_stage(trainer.accelerator) != 3:
        return parts
    parts = {"policy": {}, "value": {}}
    for key, tensor in (trainer.accelerator.get_state_dict(trainer.model) or {}).items():
        part, name = key.split(".", 1)
        parts[part][name] = tensor
    return parts


@contextmanager
def shared_atomic_directory(accelerator, final: Path):
    """`atomic_directory` that every rank writes into: the main process creates it and commits it after a barrier,
    so the COMMITTED marker means that all ranks finished writing."""
    from accelerate.utils import broadcast_object_list

    with atomic_directory(final) if accelerator.is_main_process else nullcontext() as tmp:
        tmp = Path(broadcast_object_list([tmp])[0])
        yield tmp
        accelerator.wait_for_everyone()


ENGINE_CHECKPOINT = ("deepspeed", "engine")  # sub-directory and DeepSpeed tag inside a PPO checkpoint


def save_engine_state(trainer: Trainer, directory: Path) -> None:
    """DeepSpeed: every rank writes its shard of the optimizer state (and ZeRO-3 weight shards) through the engine."""
    if zero_stage(trainer.accelerator) is not None:
        folder, tag = ENGINE_CHECKPOINT
        trainer.model.save_checkpoint(str(directory / folder), tag=tag, save_latest=False)


def load_engine_state(trainer: Trainer, path: str) -> bool:
    """DeepSpeed: restore weights and optimizer shards from the engine's files (same ZeRO stage and world size)."""
    if zero_stage(trainer.accelerator) is None:
        return False
    folder, tag = ENGINE_CHECKPOINT
    loaded, _ = trainer.model.load_checkpoint(
        str(Path(path) / folder), tag=tag, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise ResumeError(f"resume_from_checkpoint: {path} has no DeepSpeed state under {folder}/{tag}")
    return True


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: complete or ignored, and exact


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(model: torch.nn.Module, where: str, accelerator=None) -> None:
    """Non-finite weights are never saved. Each rank checks what it holds (under ZeRO-3: its shard); all agree."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(getattr(p, "ds_tensor", p)).all()]
    anywhere = len(bad)
    if accelerator is not None and accelerator.num_processes > 1:
        anywhere = int(accelerator.reduce(torch.tensor([len(bad)], device=accelerator.device), "sum").item())
    if anywhere:
        name = bad[0] if bad else "(on another rank)"
        raise TrainingAborted(f"{where}: parameter {name} has non-finite values; not saving")


def save_checkpoint(trainer: Trainer) -> None:
    """Weights (safetensors), trainer state and, under DeepSpeed, the engine's per-rank optimizer shards, committed
    together. Every rank calls it: under ZeRO-3 the weights are gathered first, a collective."""
    accelerator, config = trainer.accelerator, trainer.config
    model = accelerator.unwrap_model(trainer.model)
    check_finite(model, f"checkpoint at update {trainer.update}", accelerator)
    weights = full_weights(trainer)
    directory = Path(config.output_dir) / "checkpoints"
    accelerator.wait_for_everyone()
    with shared_atomic_directory(accelerator, directory / f"step-{trainer.update}") as tmp:
        if accelerator.is_main_process:
            model.policy.save_pretrained(
                tmp / "policy", state_dict=weights["policy"], safe_serialization=True
            )
            model.value.save_pretrained(tmp / "value", state_dict=weights["value"], safe_serialization=True)
            torch.save(
                {
                    # Under DeepSpeed the optimizer state is partitioned: the engine saves it (save_engine_state).
                    "optimizer": None if zero_stage(accelerator) else trainer.optimizer.state_dict(),
                    "scheduler": trainer.scheduler.state_dict(),
                    "kl_ctl": trainer.kl_ctl.state_dict(),
                    "rng": rng_state(),
                    "counters": {"update": trainer.update, "nonfinite_total": trainer.nonfinite_total},
                    "ema": trainer.ema,
                },
                tmp / "trainer_state.pt",
            )
        if accelerator.num_processes > 1:
            # Sampling seeds differ per rank, so each rank's RNG state is its own.
            torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        save_engine_state(trainer, tmp)
    if accelerator.is_main_process:
        rotate_checkpoints(directory, config.keep_last)
    accelerator.wait_for_everyone()


def load_checkpoint(trainer: Trainer, path: str) -> None:
    from safetensors.torch import load_file

    model = trainer.accelerator.unwrap_model(trainer.model)
    # Under DeepSpeed the engine restores the weights together with its optimizer shards.
    parts = () if load_engine_state(trainer, path) else ("policy", "value")
    for part in parts:
        target = getattr(model, part)
        files = sorted(Path(path, part).glob("*.safetensors"))
        if hasattr(target, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(target, load_file(str(files[0])))
        else:
            state = {}
            for file in files:
                state.update(load_file(str(file)))
            target.load_state_dict(state, strict=False)
    # weights_only: optimizer and RNG state are tensors and plain containers; a pickled payload is refused.
    state = torch.load(Path(path) / "trainer_state.pt", weights_only=True)
    if state["optimizer"] is not None:
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.kl_ctl.load_state_dict(state["kl_ctl"])
    trainer.update = state["counters"]["update"]
    trainer.nonfinite_total = state["counters"]["nonfinite_total"]
    trainer.ema = state["ema"]
    rank_rng = Path(path) / f"rng_state_{trainer.accelerator.process_index}.pt"
    set_rng_state(torch.load(rank_rng, weights_only=True) if rank_rng.exists() else state["rng"])


# --------------------------------------------------------------------------------------------------------------
# Main


def build_trainer(config: PPOStageConfig) -> Trainer:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    prompt_rows, prompt_report = load_prompts(config.train_data)  # validated before any model loads
    ptx_rows = load_demonstrations(config.ptx_data)[0] if config.ptx_coef > 0 else None
    policy_manifest = stage_manifest(config.policy_model, "sft")
    tokenizer = load_tokenizer(config.policy_model, config.trust_remote_code, padding_side="left")
    if policy_manifest:
        from rlhf.checkpoint import check_tokenizer_matches

        tokenizer.padding_side = policy_manifest["tokenizer"]["padding_side"]
        check_tokenizer_matches(policy_manifest, tokenizer, config.policy_model)
    if config.reward_model:
        read_manifest(config.reward_model, "reward")
    prompts, drops = load_prompt_set(config, tokenizer, prompt_rows, prompt_report)
    if drops:
        log.warning("prompts dropped: %s", drops)

    trackers = [t for t in config.report_to if t != "none"]
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # We step the scheduler once per update ourselves; linked to the optimizer, accelerate would step it
        # once per process (it assumes a dataloader sharded across processes).
        step_scheduler_with_optimizer=False,
        log_with=trackers or None,
        project_dir=config.output_dir,
        **device_options(config),
    )
    configure_deepspeed(accelerator, config)
    # Data order is shared by all ranks (PromptSet uses config.seed); sampling must differ per rank.
    set_seed(config.seed + accelerator.process_index)
    policy, reference, value = load_models(config, tokenizer, frozen_loading(accelerator))
    model = PolicyAndValue(policy, value)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / config.total_updates)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if reference is not None:
        reference = reference.to(accelerator.device)
    kl_ctl = (
        AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        if config.target_kl
        else FixedKLController(config.kl_coef)
    )
    ptx = (
        tokenize_demonstrations(tokenizer, ptx_rows, 512, "truncate", "drop", Report()) if ptx_rows else None
    )
    with frozen_loading(accelerator):
        sources = build_reward_sources(config, accelerator.device)
    return Trainer(
        config, accelerator, tokenizer, model, reference, optimizer, scheduler, kl_ctl, sources, prompts, ptx
    )


def main(config: PPOStageConfig) -> dict[str, Any]:
    # A resume path that cannot be used is an error before any model loads.
    resume = resolve_resume(config.resume_from_checkpoint, Path(config.output_dir) / "checkpoints")
    trainer = build_trainer(config)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        begin_stage_output(config.output_dir)
        dump_config(config, f"{config.output_dir}/config.yaml")
    if resume:
        load_checkpoint(trainer, resume)
        log.warning("resumed from %s at update %d", resume, trainer.update)
    accelerator.init_trackers("ppo", config=_flat_config(config))
    started, history = time.time(), []
    bar = tqdm(
        total=config.total_updates,
        initial=trainer.update,
        desc="PPO",
        disable=not accelerator.is_main_process,
    )
    while trainer.update < config.total_updates:
        stats = run_update(trainer)
        history.append(stats)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward/total']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if trainer.update % config.save_every == 0 and trainer.update < config.total_updates:
            save_checkpoint(trainer)
    bar.close()
    save_checkpoint(trainer)
    metrics = summarise_history(history, time.time() - started, trainer)
    save_final(trainer, metrics)
    accelerator.end_training()
    return metrics


def run_update(trainer: Trainer) -> dict[str, float]:
    config, accelerator = trainer.config, trainer.accelerator
    timings: dict[str, float] = {}
    start = time.perf_counter()
    batch, stats, prompts, completions = trainer.rollout(timings)
    train_start = time.perf_counter()
    if rollout_is_finite(batch):
        stats.update(trainer.train_on(batch))
    else:
        # A NaN in the rewards (or log-probs) would poison every weight it touches: skip this update's training.
        trainer.skip_nonfinite_step()
        stats["loss/nonfinite_steps"] = 1.0
        trainer.scheduler.step()
    timings["train"] = time.perf_counter() - train_start
    trainer.kl_ctl.update(stats["objective/kl"], config.rollout_batch_size * accelerator.num_processes)
    trainer.update += 1
    elapsed = time.perf_counter() - start
    stats.update({f"time/{k}": v for k, v in timings.items()})
    stats["time/update"] = elapsed
    stats["throughput/tokens_per_second"] = float(batch.response_mask.sum()) / max(timings["generate"], 1e-9)
    stats["lr"] = trainer.scheduler.get_last_lr()[0]
    stats["loss/nonfinite_total"] = trainer.nonfinite_total
    if trainer.update % config.log_every == 0:
        accelerator.log(stats, step=trainer.update)
    if accelerator.is_main_process and (trainer.update % config.sample_every == 0 or trainer.update == 1):
        write_samples(config.output_dir, trainer.update, prompts, completions, batch.scores.tolist())
    return stats


def rollout_is_finite(batch: Rollout) -> bool:
    mask = batch.response_mask.bool()
    tensors = (
        batch.scores,
        batch.advantages[mask],
        batch.returns[mask],
        batch.logprobs[mask],
        batch.ref_logprobs[mask],
    )
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def write_samples(
    output_dir: str, update: int, prompts: list[str], completions: list[str], scores: list[float]
) -> None:
    with open(Path(output_dir) / "samples.jsonl", "a") as handle:
        for prompt, completion, score in list(zip(prompts, completions, scores, strict=True))[:8]:
            handle.write(
                json.dumps({"update": update, "prompt": prompt, "completion": completion, "score": score})
                + "\n"
            )


def summarise_history(history: list[dict[str, float]], seconds: float, trainer: Trainer) -> dict[str, Any]:
    def window(key: str, part: slice) -> float | None:
        values = [h[key] for h in history[part] if key in h]
        return float(np.mean(values)) if values else None

    n = max(1, len(history) // 5)
    return {
        "updates": trainer.update,
        "wall_seconds": round(seconds, 2),
        "reward_first": window("reward/total", slice(0, n)),
        "reward_last": window("reward/total", slice(-n, None)),
        "kl_first": window("objective/kl", slice(0, n)),
        "kl_last": window("objective/kl", slice(-n, None)),
        "kl_max": max((h["objective/kl"] for h in history), default=None),
        "eos_rate_last": window("response/eos_rate", slice(-n, None)),
        "nonfinite_steps": trainer.nonfinite_total,
        "history": history,
    }


def save_final(trainer: Trainer, metrics: dict[str, Any]) -> None:
    accelerator, config = trainer.accelerator, trainer.config
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(trainer.model)
    check_finite(model, "final policy", accelerator)
    weights = full_weights(trainer)
    if accelerator.is_main_process:
        policy = (
            model.policy.merge_and_unload()
            if hasattr(model.policy, "merge_and_unload") and config.merge_lora
            else model.policy
        )
        policy.save_pretrained(config.output_dir, state_dict=weights["policy"], safe_serialization=True)
        trainer.tokenizer.save_pretrained(config.output_dir)
        model.value.save_pretrained(
            Path(config.output_dir) / "value", state_dict=weights["value"], safe_serialization=True
        )
        if trainer.ema is not None:
            from safetensors.torch import save_file

            Path(config.output_dir, "ema").mkdir(exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in trainer.ema.items()},
                str(Path(config.output_dir, "ema", "model.safetensors")),
            )
        with open(Path(config.output_dir) / "history.jsonl", "w") as handle:
            handle.writelines(json.dumps(h) + "\n" for h in metrics["history"])
        summary = {k: v for k, v in metrics.items() if k != "history"}
        write_manifest(
            config.output_dir,
            "ppo",
            config_to_dict(config),
            content_hash(config.train_data),
            summary,
            trainer.tokenizer,
        )
    accelerator.wait_for_everyone()


def _flat_config(config: PPOStageConfig) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in config_to_dict(config).items()
    }


def cli(argv: list[str] | None = None) -> int:
    from rlhf.cli import run_guarded

    return run_guarded(lambda: main(parse_config(PPOStageConfig, argv)))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

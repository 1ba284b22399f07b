"""The PPO stage: set-up, the loop of updates, the final save. One update's steps are in `rlhf.ppo.update`."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf.checkpoint import (
    begin_stage_output,
    check_tokenizer_matches,
    read_manifest,
    resolve_resume,
    set_aside_later_checkpoints,
    stage_manifest,
    tokenizer_differences,
    write_manifest,
)
from rlhf.config import ConfigError, config_to_dict, dump_config, parse_config
from rlhf.data import (
    Report,
    content_hash,
    load_demonstrations,
    load_prompts,
    render_prompt,
    tokenize_demonstrations,
)
from rlhf.distributed import (
    configure_deepspeed,
    device_options,
    frozen_loading,
    full_weights,
    mean_over_ranks,
    zero_stage,
)
from rlhf.launch import warn_about_cpu_threads
from rlhf.losses import AdaptiveKLController, FixedKLController
from rlhf.models import (
    LoraSettings,
    disable_dropout,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    read_model_config,
)
from rlhf.ppo.checkpoint import PARTS, check_finite, load_checkpoint, save_checkpoint
from rlhf.ppo.config import PPOStageConfig
from rlhf.ppo.update import PPORun, PromptSet
from rlhf.rewards import ENCODER_TYPES, RewardModelScorer, load_function
from rlhf.rollout import PolicyAndValue, Rollout, enable_packing

log = logging.getLogger(__name__)


def load_prompt_set(
    config: PPOStageConfig, tokenizer, rows: list[dict[str, Any]], report: Report, world: int = 1
) -> tuple[PromptSet, dict[str, int]]:
    """Prompts that fit `max_prompt_length`; at least one full rollout batch for each of the `world` ranks (a rank
    short of prompts would run fewer micro-batches than the others, and their collectives would fall out of step)."""
    ids, kept = [], []
    for row in rows:
        encoded = tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        if len(encoded) > config.max_prompt_length:
            report.drop("prompt over max_prompt_length")
            continue
        ids.append(encoded)
        kept.append(row)
    if len(kept) < config.rollout_batch_size * world:
        per_rank = f" x {world} processes" if world > 1 else ""
        raise ConfigError(
            f"train_data: {len(kept)} usable prompts, fewer than rollout_batch_size {config.rollout_batch_size}"
            f"{per_rank}"
        )
    return PromptSet(ids, kept), report.drops


def resolve_reward_sources(config: PPOStageConfig) -> dict[str, Any]:
    """What each source needs that no model does, resolved before any model loads, so that a bad name or file is an
    error (exit 2) then, not after the policy, reference and value models have loaded: a user function imported;
    the safety config read with its rubric and examples. The reward model needs nothing here."""
    resolved: dict[str, Any] = {}
    for name in config.reward_sources:
        if name == "safety":
            from rlhf.safety import SafetyConfig
            from rlhf.safety.reward import read_classifier_files

            safety = SafetyConfig.from_yaml(config.safety_config)
            resolved[name] = (safety, read_classifier_files(safety))
        elif name != "reward_model":
            resolved[name] = load_function(name, config.reward_allowed_modules)
    return resolved


def check_value_init(config: PPOStageConfig, reward_manifest: dict[str, Any] | None, tokenizer) -> None:
    """`value_init: reward` starts the value model from the reward model and feeds it the policy's token ids, one
    value per position: that needs the policy's vocabulary and a causal model (an encoder's value at token t would
    see the tokens after t). Anything else is a `ConfigError` now, not a value model that silently reads nonsense."""
    if config.value_init != "reward" or reward_manifest is None:
        return
    problems = []
    model_type = (read_model_config(config.reward_model) or {}).get("model_type")
    if model_type in ENCODER_TYPES:
        problems.append(f"it is a {model_type} encoder, not a causal model")
    problems += [
        f"its tokenizer's {key} is {recorded!r}, the policy's {found!r}"
        for key, recorded, found in tokenizer_differences(
            reward_manifest, tokenizer, ("vocab_size", "pad_token_id", "eos_token_id")
        )
    ]
    if problems:
        raise ConfigError(
            f"value_init: 'reward' starts the value model from {config.reward_model}, but {'; '.join(problems)}."
            " Set value_init: policy (a fresh value head on the policy)"
        )


def build_reward_sources(
    config: PPOStageConfig, device, reward_manifest: dict[str, Any] | None, resolved: dict[str, Any]
) -> dict[str, tuple[Any, float]]:
    """name -> (source, weight); the sources that load a model load here, from `resolve_reward_sources`' results."""
    sources = {}
    for name, weight in zip(config.reward_sources, config.reward_weights, strict=True):
        if name == "reward_model":
            scorer = RewardModelScorer(
                config.reward_model, device, clip=config.reward_clip, manifest=reward_manifest
            )
            sources[name] = (scorer, weight)
        elif name == "safety":
            from rlhf.safety import SafetyReward
            from rlhf.safety.reward import build_classifier

            safety, files = resolved[name]
            sources[name] = (SafetyReward(safety, build_classifier(safety, files)), weight)
        else:
            sources[name] = (resolved[name], weight)
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
            enable_packing(model)  # padding-free forward passes where the model family supports them
    return policy, reference, value


def read_inputs(config: PPOStageConfig) -> tuple[list[dict], Report, dict[str, Any], list[dict] | None]:
    """Everything the stage reads but its models, validated before any model loads (and by `rlhf pipeline` before
    its first stage runs): the prompts with their report, the resolved reward sources, the ptx demonstrations."""
    prompt_rows, prompt_report = load_prompts(config.train_data)
    resolved_sources = resolve_reward_sources(config)
    ptx_rows = load_demonstrations(config.ptx_data)[0] if config.ptx_coef > 0 else None
    return prompt_rows, prompt_report, resolved_sources, ptx_rows


def build_run(config: PPOStageConfig) -> PPORun:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    prompt_rows, prompt_report, resolved_sources, ptx_rows = read_inputs(config)
    policy_manifest = stage_manifest(config.policy_model, "sft")
    tokenizer = load_tokenizer(config.policy_model, config.trust_remote_code, padding_side="left")
    if policy_manifest:
        tokenizer.padding_side = policy_manifest["tokenizer"]["padding_side"]
        check_tokenizer_matches(policy_manifest, tokenizer, config.policy_model)
    # Read (and its files verified) once, before any model loads.
    reward_manifest = read_manifest(config.reward_model, "reward") if config.reward_model else None
    check_value_init(config, reward_manifest, tokenizer)
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
    prompts, drops = load_prompt_set(config, tokenizer, prompt_rows, prompt_report, accelerator.num_processes)
    if drops:
        log.warning("prompts dropped: %s", drops)
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
        # Under DeepSpeed mixed precision the engine holds the policy in bf16/fp16 and accelerate's autocast is off:
        # the reference takes the engine's dtype, so that the first update's KL is 0.
        deepspeed = zero_stage(accelerator) is not None
        engine_dtype = next(accelerator.unwrap_model(model).parameters()).dtype if deepspeed else None
        reference = reference.to(accelerator.device, dtype=engine_dtype)
    kl_ctl = (
        AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        if config.target_kl
        else FixedKLController(config.kl_coef)
    )
    ptx = (
        tokenize_demonstrations(tokenizer, ptx_rows, 512, "truncate", "drop", Report()) if ptx_rows else None
    )
    with frozen_loading(accelerator):
        sources = build_reward_sources(config, accelerator.device, reward_manifest, resolved_sources)
    return PPORun(
        config,
        accelerator,
        tokenizer,
        model,
        reference,
        optimizer,
        scheduler,
        kl_ctl,
        sources,
        prompts,
        ptx,
        # Demonstrations differ per rank, like sampling.
        ptx_generator=torch.Generator().manual_seed(config.seed + accelerator.process_index),
    )


def main(config: PPOStageConfig) -> dict[str, Any]:
    # A resume path that cannot be used is an error before any model loads.
    resume = resolve_resume(config.resume_from_checkpoint, Path(config.output_dir) / "checkpoints")
    run = build_run(config)
    accelerator = run.accelerator
    warn_about_cpu_threads(accelerator.device.type == "cpu")
    if accelerator.is_main_process:
        begin_stage_output(config.output_dir)
        dump_config(config, f"{config.output_dir}/config.yaml")
    if resume:
        load_checkpoint(run, resume)
        log.warning("resumed from %s at update %d", resume, run.update)
        if accelerator.is_main_process:
            drop_samples_after(config.output_dir, run.update)
    if accelerator.is_main_process:
        set_aside_later_checkpoints(Path(config.output_dir) / "checkpoints", resume)
    accelerator.init_trackers("ppo", config=_flat_config(config))
    started = time.time() - run.elapsed_seconds
    bar = tqdm(
        total=config.total_updates,
        initial=run.update,
        desc="PPO",
        disable=not accelerator.is_main_process,
    )
    while run.update < config.total_updates:
        stats = run_update(run)
        run.history.append(stats)
        run.elapsed_seconds = time.time() - started
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward/total']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if run.update % config.save_every == 0 and run.update < config.total_updates:
            save_checkpoint(run)
    bar.close()
    save_checkpoint(run)
    metrics = summarise_history(run, time.time() - started)
    save_final(run, metrics)
    accelerator.end_training()
    return metrics


def run_update(run: PPORun) -> dict[str, float]:
    config, accelerator = run.config, run.accelerator
    timings: dict[str, float] = {}
    start = time.perf_counter()
    batch, stats, prompts, completions = run.rollout(timings)
    train_start = time.perf_counter()
    # Ranks agree: one rank skipping training while another runs its backward passes would hang the job.
    if mean_over_ranks(float(rollout_is_finite(batch))) == 1.0:
        stats.update(run.train_on(batch))
    else:
        # A NaN in the rewards (or log-probs) would poison every weight it touches: skip this update's training.
        run.skip_nonfinite_step()
        stats["loss/nonfinite_steps"] = 1.0
        run.scheduler.step()
    timings["train"] = time.perf_counter() - train_start
    # The KL of every rank's episodes, so that beta (checkpointed from rank 0) is the same on all ranks.
    run.kl_ctl.update(
        mean_over_ranks(stats["objective/kl"]), config.rollout_batch_size * accelerator.num_processes
    )
    run.update += 1
    elapsed = time.perf_counter() - start
    stats.update({f"time/{k}": v for k, v in timings.items()})
    stats["time/update"] = elapsed
    stats["throughput/tokens_per_second"] = float(batch.response_mask.sum()) / max(timings["generate"], 1e-9)
    stats["lr"] = run.scheduler.get_last_lr()[0]
    stats["loss/nonfinite_total"] = run.nonfinite_total
    if run.update % config.log_every == 0:
        accelerator.log(stats, step=run.update)
    if accelerator.is_main_process and (run.update % config.sample_every == 0 or run.update == 1):
        write_samples(config.output_dir, run.update, prompts, completions, batch.scores.tolist())
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


def drop_samples_after(output_dir: str, update: int) -> None:
    """Forget the samples of updates past the checkpoint resumed from (they are sampled again), and a last line
    the kill cut short."""

    def kept(line: str) -> bool:
        try:
            return json.loads(line)["update"] <= update
        except json.JSONDecodeError:
            return False

    path = Path(output_dir) / "samples.jsonl"
    if path.exists():
        path.write_text("".join(filter(kept, path.read_text().splitlines(keepends=True))))


def write_samples(
    output_dir: str, update: int, prompts: list[str], completions: list[str], scores: list[float]
) -> None:
    with open(Path(output_dir) / "samples.jsonl", "a") as handle:
        for prompt, completion, score in list(zip(prompts, completions, scores, strict=True))[:8]:
            handle.write(
                json.dumps({"update": update, "prompt": prompt, "completion": completion, "score": score})
                + "\n"
            )


def summarise_history(run: PPORun, seconds: float) -> dict[str, Any]:
    history = run.history

    def window(key: str, part: slice) -> float | None:
        values = [h[key] for h in history[part] if key in h]
        return float(np.mean(values)) if values else None

    n = max(1, len(history) // 5)
    return {
        "updates": run.update,
        "wall_seconds": round(seconds, 2),
        "reward_first": window("reward/total", slice(0, n)),
        "reward_last": window("reward/total", slice(-n, None)),
        "kl_first": window("objective/kl", slice(0, n)),
        "kl_last": window("objective/kl", slice(-n, None)),
        "kl_max": max((h["objective/kl"] for h in history), default=None),
        "eos_rate_last": window("response/eos_rate", slice(-n, None)),
        "nonfinite_steps": run.nonfinite_total,
        "history": history,
    }


def save_final(run: PPORun, metrics: dict[str, Any]) -> None:
    accelerator, config = run.accelerator, run.config
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(run.model)
    check_finite(run, "final policy")
    weights = full_weights(accelerator, run.model, PARTS)
    if accelerator.is_main_process:
        policy = (
            model.policy.merge_and_unload()
            if hasattr(model.policy, "merge_and_unload") and config.merge_lora
            else model.policy
        )
        policy.save_pretrained(config.output_dir, state_dict=weights["policy"], safe_serialization=True)
        run.tokenizer.save_pretrained(config.output_dir)
        model.value.save_pretrained(
            Path(config.output_dir) / "value", state_dict=weights["value"], safe_serialization=True
        )
        if run.ema is not None:
            from safetensors.torch import save_file

            Path(config.output_dir, "ema").mkdir(exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in run.ema.items()},
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
            run.tokenizer,
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

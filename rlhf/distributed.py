"""The few places where a distributed (DDP or DeepSpeed ZeRO) launch differs from one process.

PPO is our own accelerate loop, so what DeepSpeed needs to be told, how ZeRO-3's sharded weights are gathered for
generation and saving, and how ranks agree on a check live here; the Trainer stages use the parts they need
(`nonfinite_parameter`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf.checkpoint import ResumeError, atomic_directory
from rlhf.config import ConfigError

if TYPE_CHECKING:
    from rlhf.ppo.config import PPOStageConfig

ENGINE_CHECKPOINT = ("deepspeed", "engine")  # sub-directory and DeepSpeed tag inside a PPO checkpoint


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
            raise ConfigError("use_cpu: a DeepSpeed launch runs on the GPU it finds; pass --use_cpu false")
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
        raise ConfigError(
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
            raise ConfigError(
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


def full_weights(accelerator, model, parts: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor] | None]:
    """Under ZeRO-3: the whole weights of each named sub-module of `model`, gathered from the shards onto the main
    process (a collective: every rank calls it; the other ranks get nothing). Otherwise None per part: the modules
    hold them whole."""
    if zero_stage(accelerator) != 3:
        return dict.fromkeys(parts)
    gathered: dict[str, dict[str, torch.Tensor] | None] = {part: {} for part in parts}
    for key, tensor in (accelerator.get_state_dict(model) or {}).items():
        part, name = key.split(".", 1)
        gathered[part][name] = tensor
    return gathered


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of a parameter holding NaN or inf on any rank, else None. Every rank must call it (a collective).

    Each rank checks what it holds: under ZeRO-3 a parameter is an empty placeholder and the values live in its
    shard (`ds_tensor`), so reading `param` alone would always pass there.
    """
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(getattr(p, "ds_tensor", p)).all()]
    if not sum_over_ranks(len(bad)):
        return None
    return bad[0] if bad else "(a parameter shard on another rank)"


def distributed() -> bool:
    """Whether this process is one of several joined in a process group (torch may be built without one)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def sum_over_ranks(value: float) -> float:
    """The sum of `value` over all ranks (itself in one process); NaN or inf on any rank makes it non-finite.
    Every rank must call it (a collective)."""
    if not distributed():
        return float(value)
    from accelerate import PartialState

    total = torch.tensor([float(value)], dtype=torch.float64, device=PartialState().device)
    torch.distributed.all_reduce(total)
    return float(total.item())


def mean_over_ranks(value: float) -> float:
    """The mean of `value` over all ranks. A decision that changes what runs next (skip a step, stop an epoch,
    move beta) is taken on this, so that no rank runs a collective the others skip."""
    world = torch.distributed.get_world_size() if distributed() else 1
    return sum_over_ranks(value) / world


@contextmanager
def shared_atomic_directory(accelerator, final: Path):
    """`atomic_directory` that every rank writes into: the main process creates it and commits it after a barrier,
    so the COMMITTED marker means that all ranks finished writing."""
    from accelerate.utils import broadcast_object_list

    with atomic_directory(final) if accelerator.is_main_process else nullcontext() as tmp:
        tmp = Path(broadcast_object_list([tmp])[0])
        yield tmp
        accelerator.wait_for_everyone()


def save_engine_state(accelerator, engine, directory: Path) -> None:
    """DeepSpeed: every rank writes its shard of the optimizer state (and ZeRO-3 weight shards) through the engine."""
    if zero_stage(accelerator) is not None:
        folder, tag = ENGINE_CHECKPOINT
        engine.save_checkpoint(str(directory / folder), tag=tag, save_latest=False)


def load_engine_state(accelerator, engine, path: str) -> bool:
    """DeepSpeed: restore weights and optimizer shards from the engine's files (same ZeRO stage and world size)."""
    if zero_stage(accelerator) is None:
        return False
    folder, tag = ENGINE_CHECKPOINT
    loaded, _ = engine.load_checkpoint(str(Path(path) / folder), tag=tag, load_lr_scheduler_states=False)
    if loaded is None:
        raise ResumeError(f"resume_from_checkpoint: {path} has no DeepSpeed state under {folder}/{tag}")
    return True

"""PPO checkpoints: everything a run needs to continue exactly, committed together (temp dir, marker, rename).

step-N/policy/, value/            weights (safetensors)
step-N/trainer_state.pt           optimizer (without DeepSpeed), scheduler, KL controller, counters, EMA, RNG
step-N/rng_state_{rank}.pt        each rank's RNG states (sampling seeds differ per rank), multi-process only
step-N/deepspeed/engine/          DeepSpeed: every rank's optimizer (and ZeRO-3 weight) shards
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf.checkpoint import rng_state, rotate_checkpoints, set_rng_state
from rlhf.distributed import (
    full_weights,
    load_engine_state,
    nonfinite_parameter,
    save_engine_state,
    shared_atomic_directory,
    zero_stage,
)
from rlhf.ppo.update import PPORun, TrainingAborted

PARTS = ("policy", "value")


def check_finite(run: PPORun, where: str) -> None:
    """Non-finite weights are never saved (a collective: every rank calls it)."""
    bad = nonfinite_parameter(run.accelerator.unwrap_model(run.model))
    if bad:
        raise TrainingAborted(f"{where}: parameter {bad} has non-finite values; not saving")


def run_rng_state(run: PPORun) -> dict[str, Any]:
    return {**rng_state(), "ptx": run.ptx_generator.get_state()}


def save_checkpoint(run: PPORun) -> None:
    """Weights (safetensors), run state and, under DeepSpeed, the engine's per-rank optimizer shards, committed
    together. Every rank calls it: under ZeRO-3 the weights are gathered first, a collective."""
    accelerator, config = run.accelerator, run.config
    model = accelerator.unwrap_model(run.model)
    check_finite(run, f"checkpoint at update {run.update}")
    weights = full_weights(accelerator, run.model, PARTS)
    directory = Path(config.output_dir) / "checkpoints"
    accelerator.wait_for_everyone()
    with shared_atomic_directory(accelerator, directory / f"step-{run.update}") as tmp:
        if accelerator.is_main_process:
            for part in PARTS:
                getattr(model, part).save_pretrained(
                    tmp / part, state_dict=weights[part], safe_serialization=True
                )
            torch.save(
                {
                    # Under DeepSpeed the optimizer state is partitioned: the engine saves it (save_engine_state).
                    "optimizer": None if zero_stage(accelerator) else run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(),
                    "kl_ctl": run.kl_ctl.state_dict(),
                    "rng": run_rng_state(run),
                    "counters": {
                        "update": run.update,
                        "nonfinite_total": run.nonfinite_total,
                        "nonfinite_in_a_row": run.nonfinite_in_a_row,
                        "seconds": run.elapsed_seconds,
                    },
                    "history": run.history,
                    "ema": run.ema,
                },
                tmp / "trainer_state.pt",
            )
        if accelerator.num_processes > 1:
            # Sampling seeds differ per rank, so each rank's RNG state is its own.
            torch.save(run_rng_state(run), tmp / f"rng_state_{accelerator.process_index}.pt")
        save_engine_state(accelerator, run.model, tmp)
    if accelerator.is_main_process:
        rotate_checkpoints(directory, config.keep_last)
    accelerator.wait_for_everyone()


def load_checkpoint(run: PPORun, path: str) -> None:
    from safetensors.torch import load_file

    model = run.accelerator.unwrap_model(run.model)
    # Under DeepSpeed the engine restores the weights together with its optimizer shards.
    parts = () if load_engine_state(run.accelerator, run.model, path) else PARTS
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
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.kl_ctl.load_state_dict(state["kl_ctl"])
    run.update = state["counters"]["update"]
    run.nonfinite_total = state["counters"]["nonfinite_total"]
    run.nonfinite_in_a_row = state["counters"].get("nonfinite_in_a_row", 0)
    run.elapsed_seconds = state["counters"].get("seconds", 0.0)
    run.history = state.get("history", [])
    run.ema = state["ema"]
    rank_rng = Path(path) / f"rng_state_{run.accelerator.process_index}.pt"
    rng = torch.load(rank_rng, weights_only=True) if rank_rng.exists() else state["rng"]
    set_rng_state(rng)
    if "ptx" in rng:
        run.ptx_generator.set_state(rng["ptx"])

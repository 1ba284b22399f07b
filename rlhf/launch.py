"""What a stage checks about how it was launched, before the long work starts."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_thread_warning(on_cpu: bool, local_processes: int = 1) -> str | None:
    """Why a CPU run would leave cores idle, or None.

    `accelerate launch` sets OMP_NUM_THREADS=1 unless it is told the run is on CPU (`--cpu`, or a launch config
    with `use_cpu: true`); our stage configs say `use_cpu: true` to the stage, not to the launcher, so a bare
    `accelerate launch -m rlhf.reward_model` on a 2-core machine trains at half speed without a word.
    """
    threads, cores = torch.get_num_threads(), available_cores()
    if not on_cpu or threads * local_processes >= cores:
        return None
    return (
        f"training on CPU with {threads} thread(s) in each of {local_processes} process(es) on a {cores}-core "
        f"machine (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); `accelerate launch` sets one "
        "thread unless given --cpu or --config_file configs/accelerate/cpu.yaml, or OMP_NUM_THREADS yourself"
    )


def warn_about_cpu_threads(on_cpu: bool) -> None:
    warning = cpu_thread_warning(on_cpu, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if warning:
        log.warning(warning)

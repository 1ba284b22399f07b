"""Test-only entry point for tests/test_distributed.py: a stage's own `cli`, plus a callback that records per rank.

    accelerate launch --config_file configs/accelerate/zero3_cpu.yaml tests/distributed_probe.py PROBE_DIR sft \
        --config configs/tiny/sft.yaml ...

After every optimizer step each rank hashes its full parameters (gathered first under ZeRO-3, a collective every rank
joins) and writes `PROBE_DIR/rank{N}.json` at the end: world size, backend, ZeRO stage, optimizer, and the hash per
step. The test compares ranks. Production code knows nothing about this: the probe replaces the stage module's
`CommitMarkerCallback` with a subclass, so commit markers are still written exactly as in a real run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

from rlhf import reward_model, sft
from rlhf.trainer_stage import CommitMarkerCallback

STAGES = {"sft": sft, "reward": reward_model}


def gathered(model):
    """All of the model's parameters in full on this rank for the duration (ZeRO-3 partitions them)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def parameter_hash(model) -> str:
    digest = hashlib.sha256()
    with gathered(model):
        for name, param in sorted(model.named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def make_probe(probe_dir: str):
    class ProbeCallback(CommitMarkerCallback):
        def __init__(self):
            super().__init__()
            self.steps: dict[int, str] = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.steps[state.global_step] = parameter_hash(model)

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            from accelerate.state import AcceleratorState

            plugin = AcceleratorState().deepspeed_plugin
            # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the optimizer that does the arithmetic
            inner = getattr(optimizer, "optimizer", None)
            base = getattr(inner, "optimizer", None)
            record = {
                "rank": dist.get_rank() if dist.is_initialized() else 0,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "backend": dist.get_backend() if dist.is_initialized() else None,
                "zero_stage": plugin.zero_stage if plugin is not None else None,
                "optimizer": type(optimizer).__name__,
                "zero_optimizer": type(inner).__name__ if inner is not None else None,
                "base_optimizer": type(base).__name__ if base is not None else None,
                "global_step": state.global_step,
                "steps": self.steps,
                "threads": torch.get_num_threads(),
            }
            os.makedirs(probe_dir, exist_ok=True)
            with open(os.path.join(probe_dir, f"rank{record['rank']}.json"), "w") as handle:
                json.dump(record, handle, indent=1)

    return ProbeCallback


if __name__ == "__main__":
    probe_dir, stage, *argv = sys.argv[1:]
    module = STAGES[stage]
    module.CommitMarkerCallback = make_probe(probe_dir)
    sys.exit(module.cli(argv))

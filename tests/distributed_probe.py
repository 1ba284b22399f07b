"""Test-only entry point for tests/test_distributed*.py: a stage's own `cli`, plus hooks that record per rank.

    accelerate launch --config_file configs/accelerate/zero3_cpu.yaml tests/distributed_probe.py PROBE_DIR sft \
        --config configs/demo/sft.yaml ...

After every optimizer step each rank hashes its full parameters (gathered first under ZeRO-3, a collective every rank
joins) and writes `PROBE_DIR/rank{N}.json` at the end: world size, backend, ZeRO stage, optimizer, and the hash per
step. The test compares ranks; with PROBE_NAN_WEIGHT_AT=STEP rank 1 writes NaN into its shard of one weight after
that step. Production code knows nothing about this: the probe replaces the stage module's
`CommitMarkerCallback` with a subclass, so commit markers are still written exactly as in a real run.

    accelerate launch --config_file configs/accelerate/zero3_cpu.yaml tests/distributed_probe.py PROBE_DIR ppo ...

PPO (tests/test_distributed_ppo.py) is our own loop, so the probe wraps functions of `rlhf.ppo.update` instead:
`PPORun.optimizer_step` (hash the full weights after each step, keyed `update.step`), `generate` (count the
all-gathers issued while generating: 0 when ZeRO-3's weights were gathered once before the call; the engine's
forward is counted too, as the control) and, with PROBE_NAN_AT=update.step, `ppo_policy_loss` (NaN at that step;
on rank PROBE_NAN_RANK only, when that is set).
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
from rlhf.cli import exit_process
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
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps: dict[int, str] = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if str(state.global_step) == os.environ.get("PROBE_NAN_WEIGHT_AT") and dist.get_rank() == 1:
                # A blow-up on one rank only, in the part of one weight this rank holds (its ZeRO-3 shard).
                param = next(model.parameters())
                shard = getattr(param, "ds_tensor", param)
                # The check must see a real shard: this rank holds part of the weight, not all of it.
                assert shard.numel() < getattr(param, "ds_numel", shard.numel()), "weight is not sharded"
                shard.data.fill_(float("nan"))
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


GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced")


def counting_gathers(action, into: list):
    """Run `action`; append to `into` how many all-gathers DeepSpeed's comm backend issued meanwhile."""
    from deepspeed import comm

    backend, calls = comm.comm.cdb, [0]
    if backend is None:  # plain DDP: DeepSpeed's comm is not in use, nothing to count
        return action()

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in GATHERS:
        setattr(backend, name, counting(getattr(backend, name)))
    try:
        return action()
    finally:
        for name in GATHERS:
            delattr(backend, name)  # drops the instance attribute: the class's method shows through again
        into.append(calls[0])


def run_ppo(probe_dir: str, argv: list[str], nan_at: str | None, nan_rank: int | None) -> int:
    """`rlhf.ppo.cli` with hashes after each optimizer step (key `update.step`) and all-gather counts; `nan_at`
    (a key) makes that step's policy loss NaN, as a numerical blow-up would, on every rank or on `nan_rank`."""
    from rlhf.distributed import zero_stage
    from rlhf.ppo import stage, update

    record: dict = {"steps": {}, "policy_steps": {}, "generate_gathers": [], "forward_gathers": []}
    trainers, current = [], {"key": None}
    real_step, real_generate, real_forward = (
        update.PPORun.optimizer_step,
        update.generate,
        update.PPORun.forward_in_chunks,
    )
    real_policy_loss = update.ppo_policy_loss

    def optimizer_step(self, batch, minibatch):
        if not trainers:
            trainers.append(self)
            # Now, while the process group is up (end_training tears it down).
            record.update(
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                backend=dist.get_backend(),
                zero_stage=zero_stage(self.accelerator),
                zero_optimizer=type(getattr(self.optimizer, "optimizer", None)).__name__,
            )
        current["key"] = f"{self.update}.{sum(k.startswith(f'{self.update}.') for k in record['steps'])}"
        stats = real_step(self, batch, minibatch)
        model = self.accelerator.unwrap_model(self.model)
        record["steps"][current["key"]] = parameter_hash(model)
        record["policy_steps"][current["key"]] = parameter_hash(model.policy)
        return stats

    def policy_loss(*args, **kwargs):
        loss, stats = real_policy_loss(*args, **kwargs)
        blows_up = current["key"] == nan_at and nan_rank in (None, dist.get_rank())
        return (loss * float("nan") if blows_up else loss), stats

    def generate(*args, **kwargs):
        return counting_gathers(lambda: real_generate(*args, **kwargs), record["generate_gathers"])

    def forward_in_chunks(self, batch):
        # The control: the engine's own forward under ZeRO-3 gathers each layer's weights.
        return counting_gathers(lambda: real_forward(self, batch), record["forward_gathers"])

    update.PPORun.optimizer_step = optimizer_step
    update.PPORun.forward_in_chunks = forward_in_chunks
    update.generate = generate
    update.ppo_policy_loss = policy_loss
    code = stage.cli(argv)
    if trainers:
        record.update(updates=trainers[0].update, nonfinite_total=trainers[0].nonfinite_total)
        os.makedirs(probe_dir, exist_ok=True)
        with open(os.path.join(probe_dir, f"rank{record['rank']}.json"), "w") as handle:
            json.dump(record, handle, indent=1)
    return code


if __name__ == "__main__":
    probe_dir, stage, *argv = sys.argv[1:]
    if stage == "ppo":
        nan_rank = os.environ.get("PROBE_NAN_RANK")
        exit_process(
            run_ppo(probe_dir, argv, os.environ.get("PROBE_NAN_AT"), int(nan_rank) if nan_rank else None)
        )
    module = STAGES[stage]
    module.CommitMarkerCallback = make_probe(probe_dir)
    exit_process(module.cli(argv))

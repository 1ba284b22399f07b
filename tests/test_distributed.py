"""SFT and the reward model in 2 processes on CPU under DeepSpeed ZeRO-2 and ZeRO-3 (gloo), as CI runs them.

Each run is a real `accelerate launch --config_file configs/accelerate/zero{2,3}_cpu.yaml` of the stage's own `cli`,
through tests/distributed_probe.py, which adds one callback: every rank records a hash of its full parameters after
each optimizer step. The tests assert that the ranks agree at every step, that the saved output reloads as an
ordinary HF model with the trained weights, and that `resume_from_checkpoint: auto` continues from the last
committed checkpoint to the same weights as an uninterrupted run. Tiny model, 6 steps: each launch takes ~25 s.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch_probe
from distributed_probe import parameter_hash

ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
STEPS, SAVE_EVERY = 6, 3
STAGE_FILES = {
    # stage: (stage config, train data, eval data, rows of each kept)
    "sft": ("configs/demo/sft.yaml", "data/demo/sft.jsonl", "data/demo/sft_eval.jsonl", (64, 16)),
    "reward": (
        "configs/demo/reward.yaml",
        "data/demo/rankings.jsonl",
        "data/demo/rankings_eval.jsonl",
        (48, 12),
    ),
}


@dataclass
class Run:
    output_dir: Path
    ranks: list[dict]

    @property
    def steps(self) -> dict[str, str]:
        return self.ranks[0]["steps"]


def head(source: str, rows: int, target: Path) -> str:
    with open(REPO / source) as handle:
        target.write_text("".join(handle.readline() for _ in range(rows)))
    return str(target)


def launch(stage: str, zero: int, root: Path, model_dir: str, env: dict | None = None, **overrides) -> Run:
    """One 2-process run of `stage` under ZeRO-`zero`; returns each rank's probe record."""
    done = run_launch(stage, zero, root, model_dir, env, **overrides)
    assert done.returncode == 0, f"launch failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}"
    probe_dir = root / "probe"
    ranks = [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return Run(root / "out", ranks)


def run_launch(
    stage: str,
    zero: int,
    root: Path,
    model_dir: str,
    env: dict | None = None,
    accelerate_config: Path | None = None,
    **overrides,
):
    """The `accelerate launch` of one 2-process run; -> the finished process (returncode, stdout, stderr)."""
    config, train, evaluation, (n_train, n_eval) = STAGE_FILES[stage]
    root.mkdir(parents=True, exist_ok=True)
    output_dir = root / "out"
    args = {
        "config": config,
        "model_name_or_path": model_dir,
        "train_data": head(train, n_train, root / "train.jsonl"),
        "eval_data": head(evaluation, n_eval, root / "eval.jsonl"),
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "save_strategy": "steps",
        "save_steps": SAVE_EVERY,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "report_to": "none",
        # Required on a CPU-only machine: without it accelerate sees no backend and counts 1 process while
        # DeepSpeed counts 2 ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
        "use_cpu": "true",
        **overrides,
    }
    config_file = accelerate_config or ACCELERATE_CONFIGS / f"zero{zero}_cpu.yaml"
    return launch_probe(config_file, root / "probe", stage, args, env)


def auto_class(stage: str):
    import transformers

    return (
        transformers.AutoModelForCausalLM
        if stage == "sft"
        else transformers.AutoModelForSequenceClassification
    )


def reload(stage: str, path: Path):
    """The output as an ordinary HF model: no DeepSpeed, every weight present in the file."""
    model, info = auto_class(stage).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def assert_ranks_agree(run: Run, zero: int, steps: list[int]) -> None:
    rank0, rank1 = run.ranks
    for record in run.ranks:
        assert (record["world_size"], record["backend"], record["zero_stage"]) == (2, "gloo", zero)
    assert sorted(int(step) for step in rank0["steps"]) == steps
    # Every optimizer step changed the weights, and both ranks hold the same full weights after each one.
    assert len(set(rank0["steps"].values())) == len(steps)
    assert rank0["steps"] == rank1["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_stage_trains_in_two_processes_under_zero(stage, zero, tmp_path, tiny_model_dir):
    run = launch(stage, zero, tmp_path, tiny_model_dir)
    assert_ranks_agree(run, zero, list(range(1, STEPS + 1)))
    assert run.ranks[0]["zero_optimizer"] == (
        "DeepSpeedZeroOptimizer_Stage3" if zero == 3 else "DeepSpeedZeroOptimizer"
    )
    assert (run.output_dir / "manifest.json").is_file()

    trained = reload(stage, run.output_dir)
    # The saved file holds exactly what the ranks trained (under ZeRO-3: the gathered shards).
    assert parameter_hash(trained) == run.steps[str(STEPS)]
    initial = dict(auto_class(stage).from_pretrained(tiny_model_dir, num_labels=1).named_parameters())
    for name, weight in trained.named_parameters():
        assert torch.isfinite(weight).all(), name
        assert weight.shape == initial[name].shape, name
    backbone = [name for name in initial if name.startswith("model.")]
    assert all(not torch.equal(trained.get_parameter(n), initial[n]) for n in backbone)
    if zero == 3:
        # Intermediate Trainer checkpoints are consolidated too (zero3_save_16bit_model).
        assert (
            parameter_hash(reload(stage, run.output_dir / f"checkpoint-{SAVE_EVERY}"))
            == run.steps[str(SAVE_EVERY)]
        )


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "zero"), [("sft", 3), ("reward", 2)])
def test_resume_under_zero_continues_from_the_last_committed_checkpoint(
    stage, zero, tmp_path, tiny_model_dir
):
    full = launch(stage, zero, tmp_path / "full", tiny_model_dir)
    # The interrupted run: committed checkpoint-3, a half-written checkpoint-5 (no COMMITTED marker), nothing after.
    out = tmp_path / "interrupted" / "out"
    shutil.copytree(full.output_dir, out)
    shutil.rmtree(out / f"checkpoint-{STEPS}")
    for name in ("manifest.json", "model.safetensors"):
        (out / name).unlink()
    shutil.copytree(out / f"checkpoint-{SAVE_EVERY}", out / "checkpoint-5")
    (out / "checkpoint-5" / "COMMITTED").unlink()

    resumed = launch(stage, zero, tmp_path / "interrupted", tiny_model_dir, resume_from_checkpoint="auto")
    # Steps 4..6 only: it continued from checkpoint-3, neither from scratch nor from the uncommitted checkpoint-5.
    assert_ranks_agree(resumed, zero, list(range(SAVE_EVERY + 1, STEPS + 1)))
    # Optimizer state, scheduler and data order restored: the same weights as the uninterrupted run, bit for bit.
    assert resumed.steps == {k: v for k, v in full.steps.items() if int(k) > SAVE_EVERY}
    assert parameter_hash(reload(stage, resumed.output_dir)) == full.steps[str(STEPS)]


@pytest.mark.parametrize("path", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_name_only_known_keys(path):
    """What `accelerate launch` would do with each shipped config, short of launching (GPU ones cannot run here)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))  # unknown top-level keys are errors
    known = vars(launch_command_parser().parse_args(["script.py"]))
    unknown = [key for key in config.deepspeed_config if key not in known]
    assert not unknown, f"{path.name}: deepspeed_config keys accelerate does not know: {unknown}"
    if "deepspeed_config_file" in config.deepspeed_config:
        ds = json.loads((REPO / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] in (1, 2, 3)
        # accelerate refuses mixed_precision next to a DeepSpeed JSON; the JSON's "auto" follows the stage config.
        assert config.mixed_precision is None, f"{path.name}: set precision in the JSON, not here"


@pytest.mark.slow
def test_nonfinite_weights_on_one_zero3_rank_are_never_committed_or_saved(tmp_path, tiny_model_dir):
    """Under ZeRO-3 each rank holds only a shard; a NaN in rank 1's shard must still stop the commit and the save."""
    # The tiny model's weights are all below DeepSpeed's persistence threshold (100k elements), which keeps them
    # whole on every rank; threshold 0 shards every weight, as a real model's large ones are.
    ds_config = tmp_path / "ds_zero3_sharded.json"
    ds_config.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 3,
                    "stage3_param_persistence_threshold": 0,
                    "stage3_gather_16bit_weights_on_model_save": True,
                },
                **dict.fromkeys(
                    [
                        "gradient_accumulation_steps",
                        "gradient_clipping",
                        "train_batch_size",
                        "train_micro_batch_size_per_gpu",
                    ],
                    "auto",
                ),
            }
        )
    )
    accelerate_config = tmp_path / "zero3_sharded_cpu.yaml"
    text = (ACCELERATE_CONFIGS / "zero3_cpu.yaml").read_text()
    text = text.replace("  zero_stage: 3\n", f"  deepspeed_config_file: {ds_config}\n").replace(
        'mixed_precision: "no"\n', ""
    )
    for key in ("zero3_save_16bit_model", "offload_optimizer_device", "offload_param_device"):
        text = "\n".join(line for line in text.split("\n") if not line.strip().startswith(key))
    accelerate_config.write_text(text)
    done = run_launch(
        "sft",
        3,
        tmp_path,
        tiny_model_dir,
        env={"PROBE_NAN_WEIGHT_AT": str(STEPS)},
        accelerate_config=accelerate_config,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "is not finite after training; nothing saved" in output, output[-3000:]
    out = tmp_path / "out"
    assert (out / f"checkpoint-{SAVE_EVERY}" / "COMMITTED").exists()
    assert not (out / f"checkpoint-{STEPS}" / "COMMITTED").exists()
    assert not (out / "manifest.json").exists() and not (out / "model.safetensors").exists()

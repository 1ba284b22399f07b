"""PPO in 2 processes on CPU under DeepSpeed ZeRO-2 and ZeRO-3 (gloo), as CI runs it.

Each run is a real `accelerate launch --config_file configs/accelerate/zero{2,3}_cpu.yaml` of `rlhf.ppo`'s own `cli`
through tests/distributed_probe.py, which records per rank a hash of the full weights after every optimizer step
(keyed `update.step`) and the all-gathers issued while generating. The tests assert that both ranks hold the same
weights after every step, that generation under ZeRO-3 gathers the weights once per rollout (not per layer per
token), that the final policy reloads as an ordinary HF model holding exactly what the ranks trained, that a resumed
run continues from the last committed checkpoint to the same weights as an uninterrupted one (tolerance: none, bit
for bit), and that DeepSpeed skips an optimizer step whose loss is NaN. One run under plain DDP
(configs/accelerate/ddp_cpu.yaml) checks that a NaN loss on one rank skips the step on both.

Tiny model, 4 updates of 4 optimizer steps (2 micro-batches accumulated each): one launch takes ~25-35 s once
DeepSpeed's CPU comm module is compiled (see tests/test_distributed.py). The uninterrupted runs are shared by the
tests of a module (one per ZeRO stage).
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
UPDATES, SAVE_EVERY = 4, 2
STEPS_PER_UPDATE = 4  # ppo_epochs 2 x (rollout_batch_size 4 / mini_batch_size 2)
PROMPT_ROWS = 64


@dataclass
class Run:
    output_dir: Path
    ranks: list[dict]

    @property
    def steps(self) -> dict[str, str]:
        return self.ranks[0]["steps"]

    @property
    def policy_steps(self) -> dict[str, str]:
        return self.ranks[0]["policy_steps"]


def step_keys(first_update: int = 0) -> list[str]:
    return [f"{u}.{k}" for u in range(first_update, UPDATES) for k in range(STEPS_PER_UPDATE)]


@pytest.fixture(scope="module")
def ppo_model_dir(tmp_path_factory) -> str:
    """The tiny Llama of `rlhf init-tiny`, its tokenizer trained on the demo SFT data."""
    from rlhf.models import TinySize, init_tiny

    size = TinySize(hidden_size=64, layers=2, heads=2, intermediate_size=128, vocab_size=400)
    return init_tiny(
        str(tmp_path_factory.mktemp("ppo_tiny") / "model"), size, [str(REPO / "data/demo/sft.jsonl")]
    )


def launch(zero: int | None, root: Path, model_dir: str, env: dict | None = None, **overrides) -> Run:
    """One 2-process PPO run under ZeRO-`zero` (plain DDP for None); returns each rank's probe record."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.jsonl"
    with open(REPO / "data/demo/prompts.jsonl") as handle:
        prompts.write_text("".join(handle.readline() for _ in range(PROMPT_ROWS)))
    args = {
        "policy_model": model_dir,
        "train_data": str(prompts),
        "output_dir": str(root / "out"),
        "reward_sources": "ppo_rewards:digits",
        "reward_weights": "1.0",
        "reward_allowed_modules": "ppo_rewards",
        "value_init": "policy",
        "max_new_tokens": 8,
        "temperature": 1.0,
        "rollout_batch_size": 4,
        "mini_batch_size": 2,
        "micro_batch_size": 1,
        "ppo_epochs": 2,
        "total_updates": UPDATES,
        "save_every": SAVE_EVERY,
        "learning_rate": 1e-2,
        "report_to": "none",
        # Keeps accelerate from looking for a GPU; under DeepSpeed PPO then asks for gloo (rlhf.ppo.device_options).
        "use_cpu": "true",
        "seed": 0,
        **overrides,
    }
    probe_dir = root / "probe"
    accelerate_config = "ddp_cpu.yaml" if zero is None else f"zero{zero}_cpu.yaml"
    done = launch_probe(ACCELERATE_CONFIGS / accelerate_config, probe_dir, "ppo", args, env)
    assert done.returncode == 0, f"launch failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}"
    ranks = [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return Run(root / "out", ranks)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, ppo_model_dir):
    """The uninterrupted run per ZeRO stage, launched on first use and shared by this module's tests."""
    runs: dict[int, Run] = {}

    def get(zero: int) -> Run:
        if zero not in runs:
            runs[zero] = launch(zero, tmp_path_factory.mktemp(f"ppo_zero{zero}"), ppo_model_dir)
        return runs[zero]

    return get


def assert_ranks_agree(run: Run, zero: int, keys: list[str]) -> None:
    rank0, rank1 = run.ranks
    for record in run.ranks:
        assert (record["world_size"], record["backend"], record["zero_stage"]) == (2, "gloo", zero)
        assert record["zero_optimizer"] == (
            "DeepSpeedZeroOptimizer_Stage3" if zero == 3 else "DeepSpeedZeroOptimizer"
        )
    assert list(rank0["steps"]) == keys
    # Both ranks hold the same full weights (policy and value) after every optimizer step.
    assert rank0["steps"] == rank1["steps"]
    assert rank0["policy_steps"] == rank1["policy_steps"]


def reload_policy(path: Path):
    """The saved policy as an ordinary HF model: no DeepSpeed, every weight present in the file."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_ppo_trains_in_two_processes_under_zero(zero, full_runs, ppo_model_dir):
    run = full_runs(zero)
    assert_ranks_agree(run, zero, step_keys())
    assert len(set(run.steps.values())) == len(run.steps), "an optimizer step left the weights unchanged"
    assert all(record["nonfinite_total"] == 0 for record in run.ranks)
    if zero == 3:
        # The policy's weights are gathered once per rollout, before `generate`: no all-gather while it samples
        # (per layer per token otherwise). The engine's own forward does gather: the counter works.
        for record in run.ranks:
            assert record["generate_gathers"] == [0] * UPDATES
            assert all(count > 0 for count in record["forward_gathers"])
    assert (run.output_dir / "manifest.json").is_file()

    trained = reload_policy(run.output_dir)
    # The saved file holds exactly what the ranks trained (under ZeRO-3: the gathered shards).
    assert parameter_hash(trained) == run.policy_steps[step_keys()[-1]]
    initial = dict(reload_policy(ppo_model_dir).named_parameters())
    for name, weight in trained.named_parameters():
        assert torch.isfinite(weight).all(), name
        assert weight.shape == initial[name].shape, name
    layers = [name for name in initial if name.startswith("model.layers.") and name.endswith("proj.weight")]
    assert layers and all(not torch.equal(trained.get_parameter(n), initial[n]) for n in layers)
    # The intermediate checkpoint's policy is consolidated too, and the value model reloads.
    checkpoint = run.output_dir / "checkpoints" / f"step-{SAVE_EVERY}"
    assert parameter_hash(reload_policy(checkpoint / "policy")) == run.policy_steps[f"{SAVE_EVERY - 1}.3"]
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(run.output_dir / "value")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_resume_under_zero_continues_from_the_last_committed_checkpoint(
    zero, full_runs, ppo_model_dir, tmp_path
):
    full = full_runs(zero)
    # The interrupted run: committed step-2, a half-written step-3 (no COMMITTED marker), nothing after.
    checkpoints = tmp_path / "out" / "checkpoints"
    shutil.copytree(
        full.output_dir / "checkpoints" / f"step-{SAVE_EVERY}", checkpoints / f"step-{SAVE_EVERY}"
    )
    shutil.copytree(checkpoints / f"step-{SAVE_EVERY}", checkpoints / f"step-{SAVE_EVERY + 1}")
    (checkpoints / f"step-{SAVE_EVERY + 1}" / "COMMITTED").unlink()
    resumed = launch(zero, tmp_path, ppo_model_dir, resume_from_checkpoint="auto")
    # Updates 2 and 3 only: it continued from step-2, neither from scratch nor from the uncommitted step-3.
    assert_ranks_agree(resumed, zero, step_keys(SAVE_EVERY))
    # Weights, optimizer shards, scheduler, KL controller and each rank's RNG restored: every later step matches
    # the uninterrupted run bit for bit (tolerance 0), and so does the final policy.
    assert resumed.steps == {k: v for k, v in full.steps.items() if k in resumed.steps}
    assert parameter_hash(reload_policy(resumed.output_dir)) == full.policy_steps[step_keys()[-1]]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_skips_a_step_whose_loss_is_nan(zero, ppo_model_dir, tmp_path):
    """Under DeepSpeed the engine steps inside `backward`, before our finiteness check sees the loss: the guard is
    DeepSpeed's own (a non-finite gradient norm skips the step and clears the gradients). This pins that down."""
    run = launch(zero, tmp_path, ppo_model_dir, env={"PROBE_NAN_AT": "1.0"}, total_updates=2, save_every=2)
    assert_ranks_agree(run, zero, [f"{u}.{k}" for u in range(2) for k in range(STEPS_PER_UPDATE)])
    assert run.steps["1.0"] == run.steps["0.3"], "the NaN step changed the weights"
    assert run.steps["1.1"] != run.steps["1.0"], "training did not continue after the skipped step"
    assert all(record["nonfinite_total"] == 1 for record in run.ranks)
    trained = reload_policy(run.output_dir)
    assert all(torch.isfinite(w).all() for w in trained.parameters())


@pytest.mark.slow
def test_under_ddp_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(ppo_model_dir, tmp_path):
    """Plain DDP (no DeepSpeed): our own check guards the step. Rank 1 alone gets a NaN loss at step 1.0; the
    all-reduced gradient is then NaN on both ranks, so both must skip. A rank 0 that judged by its own finite loss
    would clip a NaN norm, step, and hold NaN weights that rank 1 does not."""
    run = launch(
        None, tmp_path, ppo_model_dir, env={"PROBE_NAN_AT": "1.0", "PROBE_NAN_RANK": "1"}, total_updates=2
    )
    rank0, rank1 = run.ranks
    assert (rank0["world_size"], rank0["zero_stage"]) == (2, None)
    keys = [f"{u}.{k}" for u in range(2) for k in range(STEPS_PER_UPDATE)]
    assert list(rank0["steps"]) == keys and rank0["steps"] == rank1["steps"]
    assert run.steps["1.0"] == run.steps["0.3"], "the NaN step changed the weights"
    assert run.steps["1.1"] != run.steps["1.0"], "training did not continue after the skipped step"
    assert [record["nonfinite_total"] for record in run.ranks] == [1, 1]
    trained = reload_policy(run.output_dir)
    assert all(torch.isfinite(w).all() for w in trained.parameters())

"""Fault injection: one test per promise in the README's "Reliability" section.

1 exact resume after SIGKILL · 2 complete-or-ignored checkpoints · 3 resume paths · 4 hand-off contract ·
5 numerical faults · 6 degenerate rollouts · 7 a dying rank · 8 malicious or wrong files · 9 secrets · 10 bad data
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, arithmetic_dialogues, child_env, launch_two_processes, run_cli, write_jsonl
from test_data import BAD_CASES
from test_ppo import ppo_config

from rlhf import cli
from rlhf.checkpoint import COMMIT_MARKER, HandoffError, committed_checkpoints
from rlhf.ppo import TrainingAborted, build_run, main


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def kill_after_first_checkpoint(argv: list[str], checkpoints: Path, timeout: float = 300) -> None:
    """Start a run, SIGKILL it as soon as its first checkpoint is committed (well before it ends)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", *argv],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if committed_checkpoints(checkpoints):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def args(mapping: dict) -> list[str]:
    return [item for key, value in mapping.items() for item in (f"--{key}", str(value))]


# ------------------------------------------------------------------------------------------- 1. kill and resume


def trainer_stage_args(stage: str, model_dir: str, data: Path, out: Path) -> list[str]:
    """A 40-step Trainer-stage run with a committed checkpoint every 10 steps."""
    return [
        stage,
        *args(
            {
                "model_name_or_path": model_dir,
                "train_data": data,
                "eval_fraction": 0.1,
                "output_dir": out,
                "max_steps": 40,
                "per_device_train_batch_size": 4,
                "save_strategy": "steps",
                "save_steps": 10,
                "learning_rate": 1e-3,
                "report_to": "none",
                "use_cpu": "true",
                "seed": 0,
                "logging_steps": 5,
            }
        ),
    ]


def sft_args(tmp_path: Path, model_dir: str, out: Path) -> list[str]:
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_dialogues(128, seed=3))
    return trainer_stage_args("sft", model_dir, data, out)


def reward_args(tmp_path: Path, model_dir: str, out: Path) -> list[str]:
    rows = [
        {"prompt": f"What is {a} + {b}?", "chosen": f"{a + b}.", "rejected": f"{a + b + 1}."}
        for a in range(1, 13)
        for b in range(1, 9)
    ]
    return trainer_stage_args("reward", model_dir, write_jsonl(tmp_path / "pairs.jsonl", rows), out)


@pytest.mark.slow
@pytest.mark.parametrize("stage_args", [sft_args, reward_args], ids=["sft", "reward"])
def test_trainer_stage_killed_and_resumed_matches_uninterrupted(tmp_path, tiny_model_dir, stage_args):
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = run_cli(*stage_args(tmp_path, tiny_model_dir, full))
    assert result.returncode == 0, result.stderr[-2000:]
    kill_after_first_checkpoint(stage_args(tmp_path, tiny_model_dir, killed), killed)
    assert not (killed / "manifest.json").exists()  # a killed run never looks finished
    result = run_cli(*stage_args(tmp_path, tiny_model_dir, killed), "--resume_from_checkpoint", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_weights(full, killed)


@pytest.mark.slow
def test_ppo_killed_and_resumed_matches_uninterrupted_including_next_rollout(tmp_path, tiny_model_dir):
    write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"What is {a} + {b}?"} for a in range(1, 9) for b in range(1, 5)],
    )
    base = {
        "policy_model": tiny_model_dir,
        "train_data": tmp_path / "prompts.jsonl",
        "reward_sources": "ppo_rewards:digits",
        "reward_allowed_modules": "ppo_rewards",
        "value_init": "policy",
        "max_new_tokens": 10,
        "rollout_batch_size": 8,
        "mini_batch_size": 4,
        "micro_batch_size": 2,
        "ppo_epochs": 2,
        "total_updates": 8,
        "save_every": 2,
        "sample_every": 1,
        "keep_last": 10,
        "learning_rate": 3e-3,
        "report_to": "none",
        "use_cpu": "true",
    }
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_cli("ppo", *args({**base, "output_dir": full})).returncode == 0
    kill_after_first_checkpoint(["ppo", *args({**base, "output_dir": killed})], killed / "checkpoints")
    resumed_from = int(committed_checkpoints(killed / "checkpoints")[-1].name.split("-")[1])
    result = run_cli("ppo", *args({**base, "output_dir": killed, "resume_from_checkpoint": "auto"}))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_weights(full, killed)
    # The rollout right after the resume point sampled the same tokens as the uninterrupted run's.
    sampled = lambda path: [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    after = [s for s in sampled(full) if s["update"] == resumed_from + 1]
    assert after and after == [s for s in sampled(killed) if s["update"] == resumed_from + 1]
    # The record covers the whole run, not the part after the resume: samples once each, every update's statistics.
    assert sampled(killed) == sampled(full)
    steady = lambda path: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "throughput/"))}
        for line in (path / "history.jsonl").read_text().splitlines()
    ]
    assert len(steady(killed)) == 8 and steady(killed) == steady(full)
    metrics = [json.loads((path / "manifest.json").read_text())["metrics"] for path in (full, killed)]
    for key in ("reward_first", "kl_first", "reward_last", "kl_max"):
        assert metrics[1][key] == metrics[0][key], key
    assert metrics[1]["wall_seconds"] > 0


# ------------------------------------------------------------------------------------------- 2. complete or ignored


def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_resume_skips_the_partial(
    tmp_path, tiny_model_dir, monkeypatch
):
    import rlhf.ppo.checkpoint as ppo

    config = ppo_config(tmp_path, tiny_model_dir, total_updates=4, save_every=2)
    real_save = torch.save

    def crash_at_second_save(obj, path, *a, **k):
        if "step-4" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ppo.torch, "save", crash_at_second_save)
    with pytest.raises(OSError, match="disk full"):
        main(config)
    checkpoints = Path(config.output_dir) / "checkpoints"
    assert [p.name for p in committed_checkpoints(checkpoints)] == ["step-2"]
    partial = [p for p in checkpoints.iterdir() if "step-4" in p.name]
    assert partial and not (partial[0] / COMMIT_MARKER).exists()
    assert not (Path(config.output_dir) / "manifest.json").exists()


def test_a_trainer_stage_crash_before_the_commit_marker_keeps_the_last_committed_checkpoint(
    tmp_path, tiny_model_dir, monkeypatch
):
    """With save_total_limit 1 the Trainer itself would delete checkpoint-6 while saving checkpoint-12, before our
    marker commits it: a crash between the two would leave nothing to resume. We rotate after the marker."""
    from test_sft import sft_config

    import rlhf.trainer_stage as trainer_stage
    from rlhf.sft import main as sft_main

    config = sft_config(tmp_path, tiny_model_dir, save_total_limit=1, max_steps=12, save_steps=6)
    real_mark, marked = trainer_stage.mark_committed, []

    def crash_at_second_commit(path):
        marked.append(Path(path).name)
        if len(marked) == 2:
            raise OSError("killed before the marker")
        real_mark(path)

    monkeypatch.setattr(trainer_stage, "mark_committed", crash_at_second_commit)
    with pytest.raises(OSError, match="killed before the marker"):
        sft_main(config)
    assert marked == ["checkpoint-6", "checkpoint-12"]
    assert [p.name for p in committed_checkpoints(config.output_dir)] == ["checkpoint-6"]
    # Without the crash, rotation keeps only the newest committed checkpoint.
    monkeypatch.setattr(trainer_stage, "mark_committed", real_mark)
    (tmp_path / "whole").mkdir()
    sft_main(sft_config(tmp_path / "whole", tiny_model_dir, save_total_limit=1, max_steps=12, save_steps=6))
    assert [p.name for p in committed_checkpoints(tmp_path / "whole" / "sft")] == ["checkpoint-12"]


# ------------------------------------------------------------------------------------------- 3. resume paths


def test_an_explicit_resume_path_that_does_not_exist_is_an_error_naming_it(tmp_path, tiny_model_dir):
    missing = tmp_path / "nowhere" / "checkpoint-3"
    result = run_cli(
        *sft_args(tmp_path, tiny_model_dir, tmp_path / "out"), "--resume_from_checkpoint", str(missing)
    )
    assert result.returncode == 2
    assert f"{missing} does not exist" in result.stderr and "Traceback" not in result.stderr


def test_auto_resume_with_nothing_to_resume_starts_fresh_with_a_warning(tmp_path, tiny_model_dir):
    result = run_cli(
        *sft_args(tmp_path, tiny_model_dir, tmp_path / "out"),
        "--max_steps",
        "2",
        "--resume_from_checkpoint",
        "auto",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no committed checkpoint" in result.stderr and "starting fresh" in result.stderr


# ------------------------------------------------------------------------------------------- 4. hand-off contract


@pytest.fixture(scope="module")
def sft_output(tmp_path_factory, tiny_model_dir) -> Path:
    from rlhf.config import parse_config
    from rlhf.sft import SFTStageConfig
    from rlhf.sft import main as sft_main

    root = tmp_path_factory.mktemp("handoff")
    data = write_jsonl(root / "sft.jsonl", arithmetic_dialogues(32))
    config = parse_config(
        SFTStageConfig,
        args(
            {
                "model_name_or_path": tiny_model_dir,
                "train_data": data,
                "output_dir": root / "sft",
                "max_steps": 2,
                "save_strategy": "no",
                "report_to": "none",
                "use_cpu": "true",
                "eval_fraction": 0.1,
            }
        ),
    )
    sft_main(config)
    return root / "sft"


def copy_of(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "sft-copy"
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda d: (d / "model.safetensors").write_bytes(
                (d / "model.safetensors").read_bytes()[:-8] + b"corrupt!"
            ),
            "model.safetensors does not match its hash",
        ),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda d: (d / "pytorch_model.bin").write_bytes(b"pickle"), "pickle weight files"),
    ],
    ids=["corrupted-weights", "missing-file", "pickle-weights"],
)
def test_the_next_stage_refuses_a_damaged_hand_off(tmp_path, sft_output, damage, message):
    damaged = copy_of(sft_output, tmp_path)
    damage(damaged)
    config = ppo_config(tmp_path, str(damaged))
    with pytest.raises(HandoffError, match=message):
        build_run(config)


def test_the_next_stage_refuses_a_tokenizer_that_differs(tmp_path, sft_output):
    changed = copy_of(sft_output, tmp_path)
    config_file = changed / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["chat_template"] = "{{ messages }}"
    (changed / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    config_file.write_text(json.dumps(tokenizer_config))
    manifest = json.loads((changed / "manifest.json").read_text())
    from rlhf.checkpoint import sha256_file

    # Re-hash the edited files, so only the tokenizer fingerprint can catch the change.
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        manifest["files"][name] = sha256_file(changed / name)
    (changed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HandoffError, match="chat_template_sha256"):
        build_run(ppo_config(tmp_path, str(changed)))


# ------------------------------------------------------------------------------------------- 5. numerical faults


def test_a_nan_reward_skips_updates_then_aborts_naming_the_update(tmp_path, tiny_model_dir, monkeypatch):
    import rlhf.ppo.update as ppo

    real = ppo.compute_rewards
    monkeypatch.setattr(
        ppo, "compute_rewards", lambda *a, **k: tuple(t * float("nan") for t in real(*a, **k))
    )
    config = ppo_config(tmp_path, tiny_model_dir, max_nonfinite_steps=2, total_updates=4, save_every=1)
    with pytest.raises(TrainingAborted, match="update 1: 2 non-finite"):
        main(config)
    # The one checkpoint written (after the first skipped update) holds the untouched, finite start weights.
    for checkpoint in committed_checkpoints(Path(config.output_dir) / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in weights(checkpoint / "policy").values())


def test_sft_with_exploding_loss_aborts_and_commits_nothing_non_finite(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = run_cli(
        *sft_args(tmp_path, tiny_model_dir, out),
        "--learning_rate",
        "1e12",
        "--max_steps",
        "30",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--max_grad_norm",
        "0",
    )
    assert result.returncode != 0
    assert "non-finite" in result.stderr
    assert not (out / "manifest.json").exists()
    for checkpoint in committed_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in weights(checkpoint).values()), checkpoint


# ------------------------------------------------------------------------------------------- 6. degenerate rollouts


@pytest.mark.parametrize("kind", ["all-empty", "all-max-length", "one-repeated-token"])
def test_degenerate_rollouts_neither_crash_nor_produce_nan(tmp_path, tiny_model_dir, monkeypatch, kind):
    import rlhf.ppo.update as ppo

    def fake_generate(policy, query_ids, query_mask, tokenizer, config):
        shape = (query_ids.shape[0], config.max_new_tokens)
        if kind == "all-empty":
            return torch.full(shape, tokenizer.eos_token_id)
        token = 7 if kind == "all-max-length" else 42
        return torch.full(shape, token) if kind == "one-repeated-token" else torch.randint(5, 300, shape)

    monkeypatch.setattr(ppo, "generate", fake_generate)
    config = ppo_config(tmp_path, tiny_model_dir, total_updates=2, save_every=10)
    metrics = main(config)
    history = metrics["history"]
    assert metrics["nonfinite_steps"] == 0
    for stats in history:
        assert all(v == v and abs(v) != float("inf") for v in stats.values()), stats
    expected_length = 1.0 if kind == "all-empty" else float(config.max_new_tokens)
    assert history[0]["response/length"] == expected_length


# ------------------------------------------------------------------------------------------- 7. a dying rank


@pytest.mark.slow
def test_a_rank_dying_mid_run_ends_the_job_non_zero_in_bounded_time(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {a} + 1?"} for a in range(16)])
    argv = args(
        {
            "policy_model": tiny_model_dir,
            "train_data": tmp_path / "prompts.jsonl",
            "output_dir": tmp_path / "out",
            "reward_sources": "ppo_rewards:dies_on_rank_1",
            "reward_allowed_modules": "ppo_rewards",
            "value_init": "policy",
            "max_new_tokens": 6,
            "rollout_batch_size": 4,
            "mini_batch_size": 4,
            "micro_batch_size": 4,
            "ppo_epochs": 1,
            "total_updates": 6,
            "report_to": "none",
            "use_cpu": "true",
        }
    )
    start = time.time()
    result = launch_two_processes("rlhf.ppo", argv, timeout=240)
    assert result.returncode != 0
    assert time.time() - start < 240
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------- 8. malicious files


def test_a_pickled_payload_in_trainer_state_is_refused_and_never_runs(tmp_path, tiny_model_dir):
    import rlhf.ppo as ppo

    config = ppo_config(tmp_path, tiny_model_dir, total_updates=2, save_every=2)
    main(config)
    checkpoint = committed_checkpoints(Path(config.output_dir) / "checkpoints")[-1]
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Payload()}, checkpoint / "trainer_state.pt")
    run = build_run(config)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        ppo.load_checkpoint(run, str(checkpoint))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- 9. secrets


def test_canary_secrets_never_reach_logs_configs_manifests_or_checkpoints(tmp_path, tiny_model_dir):
    canaries = {"HF_TOKEN": "hf_CANARY_4f9d2b7e", "WANDB_API_KEY": "wandb_CANARY_81c3aa05"}
    out = tmp_path / "out"
    result = run_cli(
        *sft_args(tmp_path, tiny_model_dir, out), "--max_steps", "4", "--save_steps", "2", env=canaries
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            text += path.read_bytes().decode("utf-8", errors="ignore")
    for value in canaries.values():
        assert value not in text
    # A token written into a config is refused outright (the Trainer would pickle it into each checkpoint).
    refused = run_cli(
        *sft_args(tmp_path, tiny_model_dir, tmp_path / "o2"), "--hub_token", canaries["HF_TOKEN"]
    )
    assert refused.returncode == 2 and "hub_token: secrets do not belong in configs" in refused.stderr
    assert canaries["HF_TOKEN"] not in refused.stderr


# ------------------------------------------------------------------------------------------- 10. bad data


@pytest.mark.parametrize("kind,content,line,message", BAD_CASES)
def test_every_malformed_input_exits_2_with_path_and_line(tmp_path, capsys, kind, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert cli.main(["data", "validate", "--kind", kind, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}: " in err and message in err and "Traceback" not in err


def test_a_training_command_on_bad_data_exits_2_before_loading_a_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "a"}\n')
    result = run_cli(
        "reward",
        "--model_name_or_path",
        str(tmp_path / "no-model"),
        "--train_data",
        str(bad),
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "true",
        "--report_to",
        "none",
    )
    assert result.returncode == 2
    assert f"{bad}:1: chosen: identical to rejected" in result.stderr and "Traceback" not in result.stderr

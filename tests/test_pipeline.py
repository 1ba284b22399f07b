"""The pipeline end to end on a tiny model: three stages, report, skipping finished stages on a rerun, and running
again every stage after one whose output is new."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

from rlhf.config import parse_config
from rlhf.pipeline import PipelineConfig, run


def head(source: Path, target: Path, n: int) -> str:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return str(target)


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path, tiny_model_dir, capsys, monkeypatch):
    demo = REPO / "data" / "demo"
    sft_data = head(demo / "sft.jsonl", tmp_path / "sft.jsonl", 64)
    pairs = head(demo / "rankings.jsonl", tmp_path / "rankings.jsonl", 32)
    prompts = head(demo / "prompts.jsonl", tmp_path / "prompts.jsonl", 16)
    eval_prompts = head(demo / "prompts_eval.jsonl", tmp_path / "eval.jsonl", 8)
    common = "report_to: [none]\nuse_cpu: true\n"
    (tmp_path / "sft.yaml").write_text(
        f"model_name_or_path: x\ntrain_data: [{sft_data}]\noutput_dir: x\nmax_steps: 3\n"
        f"per_device_train_batch_size: 8\nsave_strategy: 'no'\neval_fraction: 0.1\n{common}"
    )
    (tmp_path / "reward.yaml").write_text(
        f"model_name_or_path: x\ntrain_data: [{pairs}]\noutput_dir: x\nmax_steps: 3\n"
        f"per_device_train_batch_size: 8\nsave_strategy: 'no'\neval_fraction: 0.2\n{common}"
    )
    (tmp_path / "ppo.yaml").write_text(
        f"policy_model: x\nreward_model: x\ntrain_data: [{prompts}]\noutput_dir: x\ntotal_updates: 2\n"
        f"rollout_batch_size: 4\nmini_batch_size: 4\nmicro_batch_size: 4\nmax_new_tokens: 8\nppo_epochs: 1\n{common}"
    )
    argv = [
        "--output_dir",
        str(tmp_path / "run"),
        "--base_model",
        tiny_model_dir,
        "--accelerate_config",
        str(REPO / "configs" / "accelerate" / "cpu.yaml"),
        "--sft_config",
        str(tmp_path / "sft.yaml"),
        "--reward_config",
        str(tmp_path / "reward.yaml"),
        "--ppo_config",
        str(tmp_path / "ppo.yaml"),
        "--eval_prompts",
        eval_prompts,
        "--gold_judge",
        "rlhf.demo:gold_judge",
        "--safety_config",
        str(REPO / "configs/safety/rules.yaml"),
        "--eval_max_new_tokens",
        "8",
    ]
    config = parse_config(PipelineConfig, argv)
    import rlhf.evaluation
    import rlhf.pipeline

    calls = {"evaluate": 0, "read_manifest": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(rlhf.evaluation, "evaluate", counted("evaluate", rlhf.evaluation.evaluate))
    monkeypatch.setattr(rlhf.pipeline, "read_manifest", counted("read_manifest", rlhf.pipeline.read_manifest))
    report = run(config)
    assert calls["evaluate"] == 1  # evaluated once; the report is written from that result
    first = capsys.readouterr().out
    assert [f"[pipeline] {s}" in first and "done in" in first for s in ("sft", "reward", "ppo")] == [True] * 3
    for stage in ("sft", "reward", "ppo"):
        assert (tmp_path / "run" / stage / "manifest.json").exists()
        assert report["stages"][stage]["wall_seconds"] > 0
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    for key in ("gold_score", "rm_score", "kl", "disallowed_compliance_rate", "allowed_refusal_rate"):
        assert key in saved["eval"]["sft"] and key in saved["eval"]["ppo"]
    assert (tmp_path / "run" / "training_curves.png").exists() and (tmp_path / "run" / "report.md").exists()

    calls["read_manifest"] = 0
    run(config)
    second = capsys.readouterr().out
    assert second.count("skipped (complete") == 3
    assert calls["read_manifest"] == 3  # each finished stage's manifest read (and its files hashed) once

    # What runs next, and whether it resumes: the real launches, recorded.
    launched: list[tuple[str, str]] = []
    real_launch = rlhf.pipeline.launch

    def recorded(config, module, argv):
        launched.append((module, argv[argv.index("--resume_from_checkpoint") + 1]))
        real_launch(config, module, argv)

    monkeypatch.setattr(rlhf.pipeline, "launch", recorded)
    created = lambda stage: json.loads((tmp_path / "run" / stage / "manifest.json").read_text())["created"]  # noqa: E731
    # An interrupted PPO run (started with this config, no manifest yet) resumes.
    (tmp_path / "run" / "ppo" / "manifest.json").unlink()
    run(config)
    assert launched == [("rlhf.ppo", "auto")]
    # An SFT output newer than the reward model (say, retrained by hand) makes the reward model and PPO stale
    # though their configs are unchanged: they run afresh, not from their old checkpoints, old outputs kept aside.
    launched.clear()
    sft_manifest = tmp_path / "run" / "sft" / "manifest.json"
    sft_manifest.write_text(
        json.dumps({**json.loads(sft_manifest.read_text()), "created": "2999-01-01T00:00:00Z"})
    )
    before = {stage: created(stage) for stage in ("reward", "ppo")}
    run(config)
    assert launched == [("rlhf.reward_model", "none"), ("rlhf.ppo", "none")]
    assert all(created(stage) != before[stage] for stage in before)
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "run").glob("*.replaced-*")) == ["ppo", "reward"]
    # A changed SFT config retrains SFT and, after it, everything downstream.
    launched.clear()
    (tmp_path / "sft.yaml").write_text(
        (tmp_path / "sft.yaml").read_text().replace("max_steps: 3", "max_steps: 4")
    )
    run(config)
    assert launched == [("rlhf.sft", "none"), ("rlhf.reward_model", "none"), ("rlhf.ppo", "none")]

"""The pipeline end to end on a tiny model: three stages, report, skipping finished stages on a rerun, and running
again every stage after one whose output is new."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, forbid_calls

from rlhf.config import parse_config
from rlhf.pipeline import PipelineConfig, run


def head(source: Path, target: Path, n: int) -> str:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return str(target)


def pipeline_argv(tmp_path: Path, base_model: str) -> list[str]:
    """Stage configs on a few demo rows, written to `tmp_path`, and the pipeline's command line for them."""
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
    return [
        "--output_dir",
        str(tmp_path / "run"),
        "--base_model",
        base_model,
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


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.mark.parametrize(
    "spoil,message",
    [
        (lambda d: append(d / "ppo.yaml", "total_updtes: 30\n"), "total_updtes"),
        (lambda d: append(d / "reward.yaml", "max_length: -1\n"), "max_length: must be above 0"),
        (lambda d: append(d / "prompts.jsonl", '{"prompt": ""}\n'), "prompts.jsonl:17: prompt: blank text"),
        (lambda d: append(d / "rankings.jsonl", "{oops\n"), "rankings.jsonl:33: malformed JSON"),
        (
            lambda d: append(d / "ppo.yaml", "reward_sources: [os:system]\n"),
            "outside the allowed import paths",
        ),
        (lambda d: append(d / "eval.jsonl", '{"prompt": "hi", "category": 5}\n'), "eval.jsonl:9"),
        (["--gold_judge", "rlhf.demo:no_such_judge"], "no_such_judge"),
        (["--safety_config", "missing.yaml"], "missing.yaml"),
        (["--eval_max_new_tokens", "0"], "eval_max_new_tokens: must be above 0"),
        (["--init_tiny", "true", "--base_model", "new", "--tiny_corpus", "no/such/corpus"], "no/such/corpus"),
        (["--accelerate_config", "no/such.yaml"], "accelerate_config: no/such.yaml: no such file"),
    ],
)
def test_a_bad_input_anywhere_is_exit_2_before_the_first_stage_runs(
    tmp_path, tiny_model_dir, monkeypatch, capsys, spoil, message
):
    """A typo in PPO's config, a bad prompt row or a missing evaluation file failed only after SFT and the reward
    model had trained (as a launcher traceback, exit 1)."""
    import rlhf.models
    import rlhf.pipeline

    argv = pipeline_argv(tmp_path, tiny_model_dir)
    if callable(spoil):
        spoil(tmp_path)
    else:
        argv += spoil
    forbid_calls(monkeypatch, rlhf.pipeline, "launch")
    forbid_calls(monkeypatch, rlhf.models, "init_tiny")
    assert rlhf.pipeline.cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_shipped_demo_pipeline_config_passes_the_checks_before_its_first_stage(monkeypatch, tmp_path):
    """Every pipeline test above writes its own configs: this one reads the shipped demo's, as scripts/demo.sh does
    (paths relative to the repository, the tiny base model not built yet)."""
    import rlhf.models
    import rlhf.pipeline

    monkeypatch.chdir(REPO)
    forbid_calls(monkeypatch, rlhf.models, "init_tiny")
    argv = ["--config", "configs/demo/pipeline.yaml", "--output_dir", str(tmp_path / "run")]
    argv += ["--base_model", str(tmp_path / "tiny-base")]
    rlhf.pipeline.check_inputs(parse_config(PipelineConfig, argv))


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path, tiny_model_dir, capsys, monkeypatch):
    argv = pipeline_argv(tmp_path, tiny_model_dir)
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


def test_a_stage_recorded_before_dataclass_values_were_mappings_is_not_taken_as_changed(tmp_path):
    """Outputs written by an earlier version hold the Trainer's AcceleratorConfig as its repr: same config."""
    from rlhf.config import config_to_dict
    from rlhf.pipeline import config_changes, stage_config

    argv = ["--config", str(REPO / "configs/demo/sft.yaml")]
    config = stage_config("sft", argv)
    recorded = json.loads(json.dumps(config_to_dict(config)))
    assert isinstance(recorded["accelerator_config"], dict) and config_changes(config, recorded) == []
    recorded["accelerator_config"] = str(config.accelerator_config)
    assert config_changes(config, recorded) == []
    recorded["learning_rate"] = 1.0
    assert config_changes(config, recorded) == ["learning_rate"]

"""Configs: every shipped YAML parses, unknown keys and unsafe YAML are errors, secrets never dumped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from rlhf.config import ConfigError, dump_config, parse_config
from rlhf.pipeline import PipelineConfig
from rlhf.ppo import PPOStageConfig
from rlhf.reward_model import RewardStageConfig
from rlhf.sft import SFTStageConfig

STAGE_CONFIGS = {
    "sft": SFTStageConfig,
    "reward": RewardStageConfig,
    "ppo": PPOStageConfig,
    "pipeline": PipelineConfig,
}


def stage_of(path: Path) -> str | None:
    return next((stage for stage in STAGE_CONFIGS if path.stem == stage), None)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=str)
def test_every_shipped_stage_config_parses(path):
    stage = stage_of(path)
    if stage is None:
        yaml.safe_load(path.read_text())  # still valid YAML
        return
    config = parse_config(STAGE_CONFIGS[stage], ["--config", str(path)])
    assert config.output_dir


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: m\ntrain_data: [a.jsonl]\noutput_dir: out\nlearning_rate: 0.1\n")
    config = parse_config(SFTStageConfig, ["--config", str(path), "--learning_rate", "0.5"])
    assert config.learning_rate == 0.5 and config.train_data == ["a.jsonl"]


def test_config_flag_with_an_equals_sign_reads_the_file(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: m\ntrain_data: [a.jsonl]\noutput_dir: out\n")
    assert parse_config(SFTStageConfig, [f"--config={path}"]).train_data == ["a.jsonl"]


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: m\ntrain_data: [a]\noutput_dir: out\nlerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="lerning_rate"):
        parse_config(SFTStageConfig, ["--config", str(path)])


def test_config_flag_without_a_file_is_a_config_error():
    with pytest.raises(ConfigError, match="--config: expected a config file after it"):
        parse_config(PPOStageConfig, ["--seed", "1", "--config"])


def test_yaml_with_python_tags_is_rejected(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model_name_or_path: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=f"{path}:1: invalid YAML"):
        parse_config(SFTStageConfig, ["--config", str(path)])


def test_field_validation_names_the_field(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: m\ntrain_data: [a]\noutput_dir: out\noverflow: chop\n")
    with pytest.raises(ValueError, match="overflow"):
        parse_config(SFTStageConfig, ["--config", str(path)])


def test_tokens_in_configs_are_refused_and_env_secrets_redacted_from_dumps(tmp_path, monkeypatch):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: m\ntrain_data: [a]\noutput_dir: out\nhub_token: hf_canary_123456\n")
    with pytest.raises(ConfigError, match="hub_token: secrets do not belong in configs"):
        parse_config(SFTStageConfig, ["--config", str(path)])
    monkeypatch.setenv("WANDB_API_KEY", "wandb_canary_123456")
    path.write_text(
        "model_name_or_path: m\ntrain_data: [a]\noutput_dir: out\nrun_name: wandb_canary_123456\n"
    )
    config = parse_config(SFTStageConfig, ["--config", str(path)])
    dump_config(config, str(tmp_path / "dump.yaml"))
    text = (tmp_path / "dump.yaml").read_text()
    assert "wandb_canary_123456" not in text
    assert yaml.safe_load(text)["train_data"] == ["a"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PPOStageConfig(), "policy_model: required"),
        (
            lambda: PPOStageConfig(
                policy_model="m", train_data=["p"], reward_sources=["safety"], kl_estimator="k9"
            ),
            "kl_estimator",
        ),
        (lambda: SFTStageConfig(output_dir="o", train_data=["d"]), "model_name_or_path: required"),
    ],
)
def test_stage_configs_raise_config_error_naming_the_field(make, message):
    """Built directly (as the pipeline builds them), not only through parse_config, a bad field is a ConfigError."""
    with pytest.raises(ConfigError, match=message):
        make()


def test_only_config_errors_exit_2_and_a_bug_is_never_taken_for_one(capsys):
    from rlhf.cli import EXIT_BAD_INPUT, run_guarded

    def check_config():
        raise ConfigError("kl_coef: expected a number")

    assert run_guarded(check_config) == EXIT_BAD_INPUT
    assert "error: config: kl_coef" in capsys.readouterr().err

    def load_config_values():  # a programming error, in a function whose name says "config"
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_guarded(load_config_values)


@pytest.mark.parametrize(
    "stage,path",
    [
        ("sft", "configs/demo/sft.yaml"),
        ("reward", "configs/demo/reward.yaml"),
        ("ppo", "configs/demo/ppo.yaml"),
    ],
)
def test_the_config_a_run_writes_runs_again_unchanged(tmp_path, stage, path):
    """A config file is the whole record of a run: the Trainer's AcceleratorConfig was written as its repr, which
    then read back as a file path."""
    from rlhf.config import config_to_dict

    first = parse_config(STAGE_CONFIGS[stage], ["--config", str(REPO / path)])
    dump_config(first, str(tmp_path / "config.yaml"))
    again = parse_config(STAGE_CONFIGS[stage], ["--config", str(tmp_path / "config.yaml")])
    assert config_to_dict(again) == config_to_dict(first)


@pytest.mark.parametrize("config_cls", [SFTStageConfig, RewardStageConfig, PPOStageConfig])
def test_a_list_field_given_one_value_in_yaml_holds_it(tmp_path, config_cls):
    """`train_data: file.jsonl` trained fully, then failed to hash its data files before saving (a str is no list)."""
    model_key = "policy_model" if config_cls is PPOStageConfig else "model_name_or_path"
    extra = "reward_sources: [safety]\n" if config_cls is PPOStageConfig else ""
    path = tmp_path / "stage.yaml"
    path.write_text(f"{model_key}: m\ntrain_data: a.jsonl\noutput_dir: out\n{extra}")
    assert parse_config(config_cls, ["--config", str(path)]).train_data == ["a.jsonl"]


@pytest.mark.parametrize(
    "config_cls,line,message",
    [
        (SFTStageConfig, "model_name_or_path: 5", "model_name_or_path: expected str, found 5"),
        (SFTStageConfig, "train_data: [1, 2]", "train_data: expected list[str], found [1, 2]"),
        (SFTStageConfig, "max_length: -5", "max_length: must be above 0, found -5"),
        (RewardStageConfig, "dtype: float8", "dtype: must be one of"),
        (PPOStageConfig, "seed: 1.5", "seed: expected int, found 1.5"),
        (PPOStageConfig, "use_lora: 3", "use_lora: expected bool, found 3"),
        (PPOStageConfig, "reward_weights: ['1']", "reward_weights: expected list[float], found ['1']"),
    ],
)
def test_a_yaml_value_of_the_wrong_type_is_a_config_error_naming_the_field(
    tmp_path, config_cls, line, message
):
    """argparse converts command-line values, not YAML ones: these were tracebacks (or, for max_length, every
    example silently cut short)."""
    model_key = "policy_model" if config_cls is PPOStageConfig else "model_name_or_path"
    extra = "reward_sources: [safety]\n" if config_cls is PPOStageConfig else ""
    path = tmp_path / "stage.yaml"
    path.write_text(f"{model_key}: m\ntrain_data: [a.jsonl]\noutput_dir: out\n{extra}{line}\n")
    if line.startswith(model_key):
        path.write_text(f"train_data: [a.jsonl]\noutput_dir: out\n{extra}{line}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(config_cls, ["--config", str(path)])


@pytest.mark.parametrize(
    "line,field,value",
    [
        ("resume_from_checkpoint: true", "resume_from_checkpoint", "auto"),
        ("resume_from_checkpoint: false", "resume_from_checkpoint", None),
        ("target_kl: 0", "target_kl", 0),  # 0 switches these off, as null does
        ("approx_kl_stop: 0", "approx_kl_stop", 0),
        ("reward_clip: 0", "reward_clip", 0),
    ],
)
def test_ppo_values_that_ran_before_the_type_and_range_checks_still_parse(tmp_path, line, field, value):
    path = tmp_path / "ppo.yaml"
    path.write_text(f"policy_model: m\ntrain_data: [a.jsonl]\nreward_sources: [safety]\n{line}\n")
    assert getattr(parse_config(PPOStageConfig, ["--config", str(path)]), field) == value

"""The whole recipe in one command: SFT -> reward model -> PPO -> evaluation -> report.

    rlhf pipeline --config configs/demo/pipeline.yaml [--seed 1 --output_dir outputs/demo-seed1]

Each stage runs as its own `accelerate launch` process with the same accelerate/DeepSpeed config, chained by
output directories: SFT starts from `base_model`, the reward model from the SFT output, PPO from both. A stage
whose manifest is complete, whose files verify and whose recorded config equals the one this run would use is
skipped, so an interrupted pipeline resumes (the interrupted stage itself resumes from its last committed
checkpoint). Every stage after one that runs (or that finished later than it) runs too, its input being new; a
stage that runs for a reason other than an interruption starts afresh, its previous output moved aside.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.checkpoint import MANIFEST, HandoffError, move_aside, read_manifest
from rlhf.config import (
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    check_field_types,
    check_values,
    config_to_dict,
    parse_config,
)

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    output_dir: str = field(
        default="outputs/demo", metadata={"help": "Holds sft/, reward/, ppo/ and the report."}
    )
    accelerate_config: str = field(
        default="configs/accelerate/cpu.yaml", metadata={"help": "accelerate launch config for every stage."}
    )
    base_model: str = field(default="", metadata={"help": "SFT start model (hub name or path)."})
    init_tiny: bool = field(
        default=False, metadata={"help": "Create base_model with `rlhf init-tiny` if it is missing."}
    )
    tiny_corpus: list[str] = field(
        default_factory=lambda: ["data/demo"], metadata={"help": "Tokenizer corpus for init_tiny."}
    )
    sft_config: str = field(default="configs/demo/sft.yaml", metadata={"help": "SFT stage config."})
    reward_config: str = field(default="configs/demo/reward.yaml", metadata={"help": "Reward stage config."})
    ppo_config: str = field(default="configs/demo/ppo.yaml", metadata={"help": "PPO stage config."})
    eval_prompts: str = field(
        default="data/demo/prompts_eval.jsonl", metadata={"help": "Held-out prompts for evaluation."}
    )
    gold_judge: str = field(
        default="", metadata={"help": "Gold judge 'module:function' for evaluation ('' = none)."}
    )
    safety_config: str = field(
        default="", metadata={"help": "Safety classifier config for evaluation rates ('' = none)."}
    )
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Answer length limit in evaluation."})
    inspect_per_category: int = field(
        default=10,
        metadata={
            "help": "Held-out prompts per category on the SFT-vs-PPO inspect page in the report (0 = none)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for every stage and the evaluation."})

    def __post_init__(self) -> None:
        check_field_types(self)
        check_values(self, {"eval_max_new_tokens": POSITIVE, "inspect_per_category": NON_NEGATIVE})


STAGES = ("sft", "reward", "ppo")


def stage_overrides(config: PipelineConfig) -> dict[str, dict[str, str]]:
    """The command-line overrides that chain the stages through their output directories."""
    out = Path(config.output_dir)
    return {
        "sft": {
            "model_name_or_path": config.base_model,
            "output_dir": str(out / "sft"),
            "seed": str(config.seed),
        },
        "reward": {
            "model_name_or_path": str(out / "sft"),
            "output_dir": str(out / "reward"),
            "seed": str(config.seed),
        },
        "ppo": {
            "policy_model": str(out / "sft"),
            "reward_model": str(out / "reward"),
            "output_dir": str(out / "ppo"),
            "seed": str(config.seed),
        },
    }


def stage_argv(config: PipelineConfig, stage: str) -> list[str]:
    path = {"sft": config.sft_config, "reward": config.reward_config, "ppo": config.ppo_config}[stage]
    argv = ["--config", path]
    for key, value in stage_overrides(config)[stage].items():
        argv += [f"--{key}", value]
    return argv


def stage_config(stage: str, argv: list[str]):
    if stage == "sft":
        from rlhf.sft import SFTStageConfig as cls
    elif stage == "reward":
        from rlhf.reward_model import RewardStageConfig as cls
    else:
        from rlhf.ppo import PPOStageConfig as cls
    return parse_config(cls, argv)


# Settings that change nothing in the output; `disable_tqdm` also defaults from the logging level of the process.
IGNORED_FOR_SKIP = {"resume_from_checkpoint", "disable_tqdm"}


def finished_manifest(stage: str, output_dir: str, stage_cfg: Any) -> dict[str, Any] | None:
    """The stage's manifest if it is complete, its files verify and its recorded config is the one we would run
    now; None when the stage must run."""
    try:
        manifest = read_manifest(output_dir, stage)
    except HandoffError:
        return None
    differs = config_changes(stage_cfg, manifest.get("config", {}))
    if differs:
        log.warning("%s: config changed (%s): running again", stage, ", ".join(differs[:5]))
        return None
    return manifest


def config_changes(config: Any, recorded: dict[str, Any]) -> list[str]:
    """The fields where the stage config this pipeline would run (`stage_config`) differs from a recorded one."""
    wanted = json.loads(json.dumps(config_to_dict(config)))

    def same(key: str) -> bool:
        # Outputs written before dataclass values (the Trainer's AcceleratorConfig) were recorded as mappings hold
        # their repr: the same value, not a reason to train again.
        value = getattr(config, key, None)
        return (
            wanted[key] == recorded.get(key)
            or dataclasses.is_dataclass(value)
            and recorded.get(key) == str(value)
        )

    return [k for k in wanted if k not in IGNORED_FOR_SKIP and not same(k)]


def resumable(output_dir: str, stage_cfg: Any, upstream: tuple | None) -> bool:
    """Whether the output holds an interrupted run to continue: unfinished (no manifest), started (its config.yaml
    written) with the config we would run now, and after the output of the stage before it was made. Anything else
    starts afresh: resuming a finished or stale run's last checkpoint would hand back its old weights."""
    started = Path(output_dir, "config.yaml")
    if not started.is_file() or Path(output_dir, MANIFEST).exists():
        return False
    try:
        recorded = yaml.safe_load(started.read_text()) or {}
    except yaml.YAMLError:
        return False
    if config_changes(stage_cfg, recorded):
        return False
    if upstream is not None:
        _, upstream_manifest = upstream
        started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started.stat().st_mtime))
        if upstream_manifest is None or upstream_manifest["created"] > started_at:
            return False
    return True


def set_aside(stage: str, output_dir: str) -> None:
    """Move a previous output out of the way of a fresh run (kept, never deleted: it may be someone's result)."""
    if Path(output_dir).is_dir() and any(Path(output_dir).iterdir()):
        target = move_aside(output_dir, "replaced")
        print(f"[pipeline] {stage:<7} previous output moved to {target}", flush=True)


def is_stale(manifest: dict[str, Any], upstream: str, upstream_manifest: dict[str, Any] | None) -> bool:
    """Whether a finished stage was built from an older output of the stage before it: that stage ran in this
    pipeline (`upstream_manifest` None), or finished after this one did. Its own config is unchanged (the paths
    are the same), so `finished_manifest` alone would keep it."""
    if upstream_manifest is None:
        log.warning("%s: %s ran again: running again", manifest["stage"], upstream)
        return True
    if upstream_manifest["created"] > manifest["created"]:
        log.warning(
            "%s: %s finished after it (%s): running again",
            manifest["stage"],
            upstream,
            upstream_manifest["created"],
        )
        return True
    return False


def needs_tiny_model(config: PipelineConfig) -> bool:
    return config.init_tiny and not Path(config.base_model, "model.safetensors").exists()


def check_inputs(config: PipelineConfig) -> dict[str, Any]:
    """Everything the stages and the evaluation will read, read now, before the first stage runs: each stage's
    config with the pipeline's overrides, every data file, PPO's reward sources, the evaluation prompts, gold
    judge and safety config. A bad one is exit 2 here, not after SFT and the reward model have trained. Returns
    the stage configs, by stage."""
    from rlhf import reward_model, sft
    from rlhf.data import load_prompts
    from rlhf.evaluation import EvalSettings
    from rlhf.ppo.stage import read_inputs
    from rlhf.rewards import load_function

    if not Path(config.accelerate_config).is_file():
        raise ConfigError(f"accelerate_config: {config.accelerate_config}: no such file")
    if needs_tiny_model(config):
        missing = [c for c in config.tiny_corpus if not os.path.exists(c)]
        if missing:
            raise ConfigError(f"tiny_corpus: no such file or directory: {', '.join(missing)}")
    configs = {s: stage_config(s, stage_argv(config, s)) for s in STAGES}
    sft_config, reward_config, ppo_config = configs.values()
    sft.load_data(sft_config)
    reward_model.load_pairs(reward_config)
    reward_model.read_reference(reward_config)
    read_inputs(ppo_config)
    load_prompts(config.eval_prompts)
    if config.gold_judge:
        load_function(config.gold_judge, EvalSettings().reward_allowed_modules)
    if config.safety_config:
        from rlhf.safety import SafetyConfig
        from rlhf.safety.reward import read_classifier_files

        read_classifier_files(SafetyConfig.from_yaml(config.safety_config))
    return configs


def launch(config: PipelineConfig, module: str, argv: list[str]) -> None:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # The stage prints its own error (and traceback, for a bug); the launcher's traceback of its child's
        # exit status would only bury it.
        "--quiet",
        "--config_file",
        config.accelerate_config,
        "-m",
        module,
        *argv,
    ]
    result = subprocess.run(
        command, env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    )
    if result.returncode != 0:
        raise SystemExit(f"pipeline: {module} failed (exit code {result.returncode}); its error is above")


def run(config: PipelineConfig) -> dict[str, Any]:
    stage_configs = check_inputs(config)  # parsed once: the skip and resume decisions compare against them
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, Any] = {}
    if needs_tiny_model(config):
        from rlhf.models import init_tiny

        init_tiny(config.base_model, corpus=config.tiny_corpus, seed=config.seed)
    upstream: tuple[str, dict[str, Any] | None] | None = None  # the stage before: name, manifest if skipped
    for stage in STAGES:
        argv = stage_argv(config, stage)
        output_dir = str(out / stage)
        start = time.time()
        manifest = finished_manifest(stage, output_dir, stage_configs[stage])
        if manifest is not None and upstream is not None and is_stale(manifest, *upstream):
            manifest = None
        if manifest is not None:
            wall = manifest["metrics"].get("wall_seconds")
            print(f"[pipeline] {stage:<7} skipped (complete: {output_dir}, {wall}s when it ran)", flush=True)
            stages[stage] = {"wall_seconds": wall, "skipped": True}
            upstream = (stage, manifest)
            continue
        resume = "auto" if resumable(output_dir, stage_configs[stage], upstream) else "none"
        if resume == "none":
            set_aside(stage, output_dir)
        upstream = (stage, None)
        module = {"sft": "rlhf.sft", "reward": "rlhf.reward_model", "ppo": "rlhf.ppo"}[stage]
        launch(config, module, [*argv, "--resume_from_checkpoint", resume])
        wall = round(time.time() - start, 1)
        stages[stage] = {"wall_seconds": wall, "skipped": False}
        print(f"[pipeline] {stage:<7} done in {wall}s -> {output_dir}", flush=True)
    start = time.time()
    results = evaluate_run(config)
    print(f"[pipeline] eval    done in {time.time() - start:.1f}s", flush=True)
    if config.inspect_per_category:
        results["inspect"] = inspect_run(config)
    from rlhf.report import write_report

    report = write_report(config, stages, results)
    print(f"[pipeline] report  -> {out / 'report.md'}", flush=True)
    return report


def evaluate_run(config: PipelineConfig) -> dict[str, Any]:
    """The PPO policy against its SFT reference on the held-out prompts (`rlhf.evaluation.evaluate`)."""
    from rlhf.evaluation import EvalSettings, evaluate

    out = Path(config.output_dir)
    return evaluate(
        policy_path=str(out / "ppo"),
        prompts_path=config.eval_prompts,
        reference_path=str(out / "sft"),
        reward_path=str(out / "reward"),
        gold=config.gold_judge or None,
        safety_config=config.safety_config or None,
        settings=EvalSettings(max_new_tokens=config.eval_max_new_tokens, seed=config.seed),
    )


def inspect_run(config: PipelineConfig) -> dict[str, Any]:
    """`rlhf inspect diff` of SFT against PPO on a few held-out prompts per category, for the report to link."""
    from rlhf.inspect.diff import report_summary

    out, start = Path(config.output_dir), time.time()
    summary = report_summary(
        str(out / "sft"), str(out / "ppo"), config.eval_prompts, out / "inspect", config.inspect_per_category
    )
    print(f"[pipeline] inspect done in {time.time() - start:.1f}s -> {out / summary['page']}", flush=True)
    return summary


def cli(argv: list[str] | None = None) -> int:
    from rlhf.cli import run_guarded

    return run_guarded(lambda: run(parse_config(PipelineConfig, argv)))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

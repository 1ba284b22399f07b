"""What the two Trainer-based stages (SFT, reward model) share: commit markers, resume, final save, manifest.

TRL's trainers run the training loop as a black box; this module only wraps it with our checkpoint contract.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from rlhf.checkpoint import (
    begin_stage_output,
    mark_committed,
    resolve_resume,
    rotate_checkpoints,
    set_aside_later_checkpoints,
    write_manifest,
)
from rlhf.config import POSITIVE, ConfigError, check_values, config_to_dict, dump_config, one_of
from rlhf.data import Report, conversation_key, split_last_rows
from rlhf.distributed import nonfinite_parameter
from rlhf.launch import warn_about_cpu_threads
from rlhf.models import DTYPES, LoraSettings, check_adapter_start

log = logging.getLogger(__name__)


@dataclass
class ModelFields:
    """Model and data fields shared by the SFT and reward-model configs (mixed into each)."""

    model_name_or_path: str = field(
        default="", metadata={"help": "Hub name or local path of the starting model."}
    )
    train_data: list[str] = field(
        default_factory=list, metadata={"help": "Training files, directories or hub names."}
    )
    eval_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Evaluation sources; empty = hold out `eval_last_rows` or `eval_fraction` of train_data."
        },
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Share of training conversations held out at random when eval_data is empty."},
    )
    eval_last_rows: int = field(
        default=0,
        metadata={
            "help": "Hold out the last N rows of train_data as eval, by conversation (training rows opening with "
            "an eval row's user turn are dropped, counted); 0 = eval_data or eval_fraction."
        },
    )
    overflow: str = field(
        default="truncate", metadata={"help": "Over-length examples: 'truncate' or 'drop' (counted)."}
    )
    dtype: str = field(
        default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names LoRA adapts (one name may be given alone; 'all-linear' for every linear)."
        },
    )

    def lora_settings(self) -> LoraSettings | None:
        if not self.use_lora:
            return None
        targets = self.lora_target_modules
        return LoraSettings(
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            targets[0] if targets == ["all-linear"] else targets,
        )

    def default_precision(self) -> None:
        """bf16 mixed precision where a GPU supports it; fp32 on CPU, where bf16 autocast is slow (TRL defaults to bf16)."""
        if getattr(self, "bf16", None) is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def check_model_fields(self) -> None:
        if getattr(self, "hub_token", None):
            # The Trainer pickles its arguments into every checkpoint (training_args.bin): a token there leaks.
            raise ConfigError(
                "hub_token: secrets do not belong in configs; set HF_TOKEN or run `hf auth login`"
            )
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path: required")
        check_adapter_start("model_name_or_path", self.model_name_or_path, self.use_lora, self.merge_lora)
        if not self.train_data:
            raise ConfigError("train_data: at least one source is required")
        if self.overflow not in ("truncate", "drop"):
            raise ConfigError(f"overflow: expected 'truncate' or 'drop', found {self.overflow!r}")
        check_values(
            self,
            {
                "dtype": one_of(*DTYPES),
                "max_length": POSITIVE,
                "lora_r": POSITIVE,
                "lora_alpha": POSITIVE,
                "lora_dropout": (lambda x: 0 <= x < 1, "in [0, 1)"),
            },
        )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: expected a value in [0, 1), found {self.eval_fraction}")
        if self.eval_last_rows < 0:
            raise ConfigError(f"eval_last_rows: expected 0 or more, found {self.eval_last_rows}")
        if self.eval_last_rows and self.eval_data:
            raise ConfigError("eval_last_rows: holds out part of train_data, so eval_data must be empty")


def split_eval(
    rows: list[Any], fraction: float, seed: int, key=lambda row: row
) -> tuple[list[Any], list[Any]]:
    """Hold out a deterministic share of rows; rows with the same key (e.g. a ranking group) stay together."""
    keys = sorted({key(row) for row in rows}, key=str)
    random.Random(seed).shuffle(keys)
    held = set(keys[: max(1, int(len(keys) * fraction))]) if fraction > 0 else set()
    return [r for r in rows if key(r) not in held], [r for r in rows if key(r) in held]


def held_out(examples: list[dict], config, report: Report) -> tuple[list[dict], list[dict], Report]:
    """Train and eval examples from train_data alone, never splitting a conversation (nor a ranking's pairs).

    `eval_last_rows` holds out the file's last rows (the same rows for every stage and seed, so an SFT run and a
    reward model on one file keep the same conversations unseen); otherwise `eval_fraction` of the conversations,
    drawn with `config.seed`. The held-out source rows move from the training report to the eval report returned.
    """
    if config.eval_last_rows:
        train, evaluation = split_last_rows(examples, config.eval_last_rows, report)
    else:
        train, evaluation = split_eval(examples, config.eval_fraction, config.seed, key=conversation_key)
    eval_report = Report(rows=len({e["source"] for e in evaluation}))
    report.rows -= eval_report.rows
    return train, evaluation, eval_report


def require_examples(split: str, examples: Sized, report: Report, reason: str) -> None:
    """A split left empty (everything held out, dropped or cut) is a `ConfigError` before any model loads; the
    Trainer would otherwise fail deep inside with a traceback."""
    if len(examples) == 0:
        raise ConfigError(f"{split} set: no examples left ({report.summary()}); {reason}")


class NonFiniteWeights(RuntimeError):
    """Training produced NaN or infinite weights; nothing is committed."""


def trainer_args(config: Any, **changes: Any) -> Any:
    """The Trainer's copy of a stage config (the config itself is the run's record and stays as given), with
    `changes`. Checkpoint rotation is taken from the Trainer: it deletes old checkpoints before the new one is
    marked committed, so a crash in between would leave none; `CommitMarkerCallback` rotates after the marker."""
    args = copy.copy(config)
    for name, value in {**changes, "save_total_limit": None}.items():
        setattr(args, name, value)
    return args


class CommitMarkerCallback(TrainerCallback):
    """Marks each Trainer checkpoint committed once the Trainer has finished writing it, if its weights are finite;
    then keeps the last `keep_last` committed checkpoints (the stage's `save_total_limit`) and, as the Trainer's own
    rotation did, the best one (`load_best_model_at_end`)."""

    def __init__(self, keep_last: int | None = None):
        self.keep_last = keep_last

    def on_save(self, args, state, control, model=None, **kwargs):
        bad = nonfinite_parameter(model) if model is not None else None
        if bad:
            log.error("checkpoint-%d has non-finite weights (%s): left uncommitted", state.global_step, bad)
        elif state.is_world_process_zero:
            mark_committed(f"{args.output_dir}/checkpoint-{state.global_step}")
            rotate_checkpoints(args.output_dir, self.keep_last, protect=state.best_model_checkpoint)


class NonFiniteLossGuard(TrainerCallback):
    """Counts non-finite logged losses; stops training after `limit` in a row, naming the step.

    The Trainer has already stepped by the time a loss is logged, so a NaN is not undone here; the guard stops the
    run, and `finish_output` refuses to save non-finite weights, so no finished-looking output carries them.
    """

    def __init__(self, limit: int = 3):
        self.limit, self.in_a_row, self.total, self.aborted_at = limit, 0, 0, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if math.isfinite(loss):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite loss at step %d (%d in a row)", state.global_step, self.in_a_row)
        if self.in_a_row >= self.limit:
            self.aborted_at = state.global_step
            control.should_training_stop = True
            control.should_save = False


def perplexity(loss: float | None) -> float | None:
    return math.exp(min(loss, 50.0)) if loss is not None else None


@dataclass
class StageRun:
    """Bookkeeping for one stage run: timings and metrics written into the manifest."""

    stage: str
    config: Any
    started: float = field(default_factory=time.time)
    metrics: dict[str, Any] = field(default_factory=dict)


def start_output(config) -> None:
    warn_about_cpu_threads(config.device.type == "cpu")
    begin_stage_output(config.output_dir)
    # transformers 5 reads the TensorBoard directory from the environment; keep the logs with the run.
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(config.output_dir, "runs")
    dump_config(config, f"{config.output_dir}/config.yaml")


def train_with_resume(trainer, config) -> dict[str, Any]:
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    if resume:
        log.info("resuming from %s", resume)
    if trainer.accelerator.is_main_process:
        set_aside_later_checkpoints(config.output_dir, resume)
    trainer.accelerator.wait_for_everyone()
    guard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteLossGuard)), None)
    result = trainer.train(resume_from_checkpoint=resume)
    if guard is not None and guard.aborted_at is not None:
        raise NonFiniteWeights(
            f"step {guard.aborted_at}: {guard.limit} non-finite losses in a row; training aborted"
        )
    return dict(result.metrics)


def finish_output(
    trainer,
    run: StageRun,
    tokenizer,
    data_hashes: dict[str, str],
    merge_lora: bool = True,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save the final model (merged adapter by default) and tokenizer, then the manifest, on the main process."""
    config = run.config
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    bad = nonfinite_parameter(model)
    if bad:
        raise NonFiniteWeights(f"{run.stage}: parameter {bad} is not finite after training; nothing saved")
    if hasattr(model, "merge_and_unload") and merge_lora:
        state_dict = None
        model = model.merge_and_unload()
    else:
        # ZeRO-3 shards parameters and only the engine can gather them (a collective: every rank calls it), so the
        # saved model reloads as an ordinary HF model; the bare module has no `zero_gather_16bit_weights_on_model_save`.
        wrapped = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
        state_dict = trainer.accelerator.get_state_dict(wrapped)
    if trainer.accelerator.is_main_process:
        model.save_pretrained(config.output_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(config.output_dir)
        with open(os.path.join(config.output_dir, "log_history.json"), "w") as handle:
            json.dump(trainer.state.log_history, handle)
        run.metrics["wall_seconds"] = round(time.time() - run.started, 2)
        write_manifest(
            config.output_dir,
            stage=run.stage,
            config=config_to_dict(config),
            data=data_hashes,
            metrics=run.metrics,
            tokenizer=tokenizer,
            extra=extra,
        )
    trainer.accelerator.wait_for_everyone()

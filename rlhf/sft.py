"""Stage 1: supervised fine-tuning on demonstrations, with TRL's `SFTTrainer` used as is.

    accelerate launch -m rlhf.sft --config configs/demo/sft.yaml --learning_rate 3e-4

We tokenise through the data module (assistant-only labels computed from the chat template, never silently
empty) and hand TRL a pre-tokenised dataset, so SFT, the reward model and PPO see identical prompt text.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlhf.checkpoint import resolve_resume, stage_manifest
from rlhf.config import ConfigError, check_field_types, parse_config
from rlhf.data import Report, content_hash, load_demonstrations, tokenize_demonstrations
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.trainer_stage import (
    CommitMarkerCallback,
    ModelFields,
    NonFiniteLossGuard,
    StageRun,
    finish_output,
    held_out,
    perplexity,
    require_examples,
    start_output,
    train_with_resume,
    trainer_args,
)

log = logging.getLogger(__name__)


@dataclass
class SFTStageConfig(ModelFields, SFTConfig):
    """SFT stage: TRL's `SFTConfig` (every TrainingArguments field) plus our model/data fields."""

    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Train only on assistant turns (default); false trains on every token."},
    )
    on_empty_mask: str = field(
        default="error",
        metadata={"help": "Examples with no trainable token: 'error' (default) or 'drop' (counted)."},
    )
    merge_lora: bool = field(default=True, metadata={"help": "Save a LoRA run as a merged full model."})
    max_length: int | None = field(default=512, metadata={"help": "Tokens per example; see `overflow`."})

    def __post_init__(self):
        check_field_types(self)
        self.default_precision()
        super().__post_init__()
        self.check_model_fields()
        if self.on_empty_mask not in ("error", "drop"):
            raise ConfigError(f"on_empty_mask: expected 'error' or 'drop', found {self.on_empty_mask!r}")


def load_data(config: SFTStageConfig) -> tuple[list[dict], list[dict], Report, Report]:
    """Train and eval rows with their data reports; every source is validated before any model loads (a
    malformed row raises DataError with PATH:LINE problems)."""
    train_rows, report = load_demonstrations(config.train_data)
    if config.eval_data:
        eval_rows, eval_report = load_demonstrations(config.eval_data)
        return train_rows, eval_rows, report, eval_report
    train_rows, eval_rows, eval_report = held_out(train_rows, config, report)
    return train_rows, eval_rows, report, eval_report


def tokenize(config: SFTStageConfig, tokenizer, rows, report: Report) -> Dataset:
    if config.assistant_only_loss:
        encoded = tokenize_demonstrations(
            tokenizer, rows, config.max_length, config.overflow, config.on_empty_mask, report
        )
    else:
        encoded = []
        for row in rows:
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True)
            # transformers 5 returns a BatchEncoding (a Mapping, not a dict); older versions a list of ids.
            ids = list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
            if config.max_length and len(ids) > config.max_length:
                if config.overflow == "drop":
                    report.drop("over max_length")
                    continue
                ids, report.truncated = ids[: config.max_length], report.truncated + 1
            encoded.append({"input_ids": ids, "labels": list(ids)})
    return Dataset.from_list(encoded)


def main(config: SFTStageConfig) -> dict:
    train_rows, eval_rows, report, eval_report = load_data(config)
    stage_manifest(config.model_name_or_path)  # a stage output as start model must be finished, intact
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    train_set = tokenize(config, tokenizer, train_rows, report)
    eval_set = tokenize(config, tokenizer, eval_rows, eval_report)
    log.warning("SFT data: train %s; eval %s", report.summary(), eval_report.summary())
    require_examples("train", train_set, report, "check eval_last_rows, max_length and overflow")
    # The stage reports the eval loss before and after training, so it needs held-out examples.
    require_examples(
        "eval", eval_set, eval_report, "give eval_data, or eval_fraction / eval_last_rows above 0"
    )

    resolve_resume(config.resume_from_checkpoint, config.output_dir)  # fail before any model loads
    start_output(config)
    run = StageRun("sft", config)
    model = load_causal_lm(
        config.model_name_or_path, tokenizer, config.dtype, config.trust_remote_code, config.lora_settings()
    )
    # Our labels already hold the assistant-only mask; TRL's own flag expects raw conversations.
    # Evaluate the start model inside train(): under DeepSpeed an evaluate() before train() either refuses
    # (ZeRO-1/2: "ZeRO inference only makes sense with ZeRO Stage 3") or leaves no training engine (ZeRO-3).
    trainer = SFTTrainer(
        model=model,
        args=trainer_args(config, assistant_only_loss=False, eval_on_start=True),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=[CommitMarkerCallback(config.save_total_limit), NonFiniteLossGuard()],
    )
    train_metrics = train_with_resume(trainer, config)
    # The first evaluation on record is the start model's (a resumed run keeps the original run's history).
    before = next(e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e)
    after = trainer.evaluate()["eval_loss"]
    run.metrics.update(
        eval_loss_before=before,
        eval_loss=after,
        perplexity_before=perplexity(before),
        perplexity=perplexity(after),
        train_loss=train_metrics.get("train_loss"),
        train_examples=len(train_set),
        eval_examples=len(eval_set),
        dropped=report.drops,
        truncated=report.truncated,
        data_report={"train": report.counts(), "eval": eval_report.counts()},
    )
    finish_output(
        trainer,
        run,
        tokenizer,
        content_hash(config.train_data + config.eval_data),
        merge_lora=config.merge_lora,
    )
    log.warning("SFT done: eval loss %.4f -> %.4f", before, after)
    return run.metrics


def cli(argv: list[str] | None = None) -> int:
    from rlhf.cli import run_guarded

    return run_guarded(lambda: main(parse_config(SFTStageConfig, argv)))


if __name__ == "__main__":
    from rlhf.cli import exit_process

    exit_process(cli(sys.argv[1:]))

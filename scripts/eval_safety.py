"""Measure safety classifiers on the hand-labelled sets; prints JSON.

    HF_HUB_OFFLINE=1 python -m scripts.eval_safety [--configs configs/safety/rules.yaml ...]
        [--prompts data/safety/labelled_prompts.jsonl] [--completions data/safety/labelled_completions.jsonl]
        [--misses]

Per config: precision / recall per prompt class, the share of allowed prompts flagged disallowed,
completion-class accuracy (prompt classes from the dataset's category, as in training) with per-class
figures, and the safety rates of the labelled completions as the classifier sees them.
(Run from the repository root with `-m`, or with the package installed, so `rlhf` imports.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rlhf.safety import (
    COMPLETION_CLASSES,
    PROMPT_CLASSES,
    SafetyConfig,
    build_classifier,
    classification_report,
    classify_pairs,
    read_labelled,
    safety_rates,
)

ROOT = Path(__file__).resolve().parents[1]


def evaluate(config_path: Path, prompt_rows: list[dict], completion_rows: list[dict], misses: bool) -> dict:
    start = time.perf_counter()
    classifier = build_classifier(SafetyConfig.from_yaml(config_path))
    prompts = [r["prompt"] for r in prompt_rows]
    gold = [r["category"] for r in prompt_rows]
    pred = classifier.classify_prompts(prompts)
    prompt_report = classification_report(gold, pred, PROMPT_CLASSES)
    n_allowed = sum(g == "allowed" for g in gold)
    flagged = sum(g == "allowed" and p == "disallowed" for g, p in zip(gold, pred, strict=True))

    c_prompts = [r["prompt"] for r in completion_rows]
    c_texts = [r["completion"] for r in completion_rows]
    categories = [r["category"] for r in completion_rows]
    _, c_pred, _ = classify_pairs(classifier, c_prompts, c_texts, categories)
    c_gold = [r["label"] for r in completion_rows]
    completion_report = classification_report(c_gold, c_pred, COMPLETION_CLASSES)
    result = {
        "config": str(config_path),
        "classifier": classifier.name,
        "prompts": {
            "n": prompt_report["n"],
            "accuracy": prompt_report["accuracy"],
            "per_class": prompt_report["per_class"],
            "allowed_flagged_disallowed": flagged / n_allowed if n_allowed else None,
            "confusion": prompt_report["confusion"],
        },
        "completions": {
            "n": completion_report["n"],
            "accuracy": completion_report["accuracy"],
            "per_class": completion_report["per_class"],
            "confusion": completion_report["confusion"],
        },
        "rates_on_labelled_completions": safety_rates(c_prompts, c_texts, categories, classifier),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if misses:
        result["prompt_misses"] = [
            {"prompt": t, "gold": g, "pred": p} for t, g, p in zip(prompts, gold, pred, strict=True) if g != p
        ]
        result["completion_misses"] = [
            {"completion": t[:100], "gold": g, "pred": p}
            for t, g, p in zip(c_texts, c_gold, c_pred, strict=True)
            if g != p
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        type=Path,
        default=[ROOT / "configs/safety/rules.yaml", ROOT / "configs/safety/embedding.yaml"],
    )
    parser.add_argument("--prompts", type=Path, default=ROOT / "data/safety/labelled_prompts.jsonl")
    parser.add_argument("--completions", type=Path, default=ROOT / "data/safety/labelled_completions.jsonl")
    parser.add_argument("--misses", action="store_true", help="also list the misclassified rows")
    args = parser.parse_args()
    _, prompt_rows = read_labelled(args.prompts)
    _, completion_rows = read_labelled(args.completions)
    results = [evaluate(c, prompt_rows, completion_rows, args.misses) for c in args.configs]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""`rlhf safety classify`: run a safety config's classifier over a JSONL file, report against its labels."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf.checkpoint import write_text_atomic
from rlhf.cli import output_file
from rlhf.config import ConfigError
from rlhf.data import DataError
from rlhf.models import ModelLoadError
from rlhf.rewards import RewardSourceError
from rlhf.safety.config import COMPLETION_CLASSES, PROMPT_CLASSES, SafetyConfig
from rlhf.safety.labelled import read_labelled
from rlhf.safety.reward import build_classifier, call_checked, classify_pairs


def classification_report(gold: list[str], pred: list[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / support and a confusion table confusion[gold][pred].

    scikit-learn's metrics as plain dicts, so they go to JSON as they are; a precision (recall) is None
    when a class is never predicted (never occurs), where scikit-learn would report 0.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # lazy: `embeddings` extra

    labels = list(classes)
    precision, recall, _, support = precision_recall_fscore_support(
        gold, pred, labels=labels, zero_division=np.nan
    )
    confusion = confusion_matrix(gold, pred, labels=labels)
    per_class = {
        c: {"precision": _number(p), "recall": _number(r), "support": int(n)}
        for c, p, r, n in zip(labels, precision, recall, support, strict=True)
    }
    return {
        "n": len(gold),
        "accuracy": float(np.trace(confusion) / len(gold)),
        "per_class": per_class,
        "confusion": {
            g: dict(zip(labels, map(int, row), strict=True)) for g, row in zip(labels, confusion, strict=True)
        },
    }


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def format_report(report: dict[str, Any]) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    classes = list(report["per_class"])
    width = max(len(c) for c in classes) + 2
    lines = [
        f"n={report['n']} accuracy={fmt(report['accuracy'])}",
        "",
        f"{'class':<{width}}precision  recall  support",
    ]
    for c, m in report["per_class"].items():
        lines.append(f"{c:<{width}}{fmt(m['precision']):>9}  {fmt(m['recall']):>6}  {m['support']:>7}")
    lines += [
        "",
        "confusion (rows: gold, columns: predicted)",
        " " * width + " ".join(f"{c[:10]:>10}" for c in classes),
    ]
    for g in classes:
        lines.append(f"{g:<{width}}" + " ".join(f"{report['confusion'][g][p]:>10}" for p in classes))
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    """`rlhf safety classify --config FILE DATA [--out FILE]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="rlhf safety", description="Safety classifiers of the safety reward."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classify", help="classify prompts or (prompt, completion) rows of a JSONL file")
    p.add_argument("--config", required=True, help="safety config YAML (configs/safety/*.yaml)")
    p.add_argument(
        "data", help="JSONL: {prompt, category?} rows or {prompt, completion, label?, category?} rows"
    )
    p.add_argument("--out", type=output_file, help="write the rows with predictions to this JSONL file")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        config = SafetyConfig.from_yaml(args.config)
        mode, rows = read_labelled(args.data)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.data}: {exc}", file=sys.stderr)
        return 2
    try:
        classifier = build_classifier(config)
        key, gold_key, classes, pred = _classify(classifier, mode, rows)
    except (ConfigError, DataError, ModelLoadError) as exc:  # files read (and model checked) before it loads
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RewardSourceError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for row, label in zip(rows, pred, strict=True):
        row[key] = label
    print(f"{args.data}: {len(rows)} {mode} classified by {classifier.name!r}")
    print("predicted: " + ", ".join(f"{c}={n}" for c, n in sorted(Counter(pred).items())))
    labelled = [(r[gold_key], r[key]) for r in rows if r.get(gold_key) is not None]
    if labelled:
        try:
            report = classification_report([g for g, _ in labelled], [q for _, q in labelled], classes)
        except ImportError:  # the rules backend runs without the `embeddings` extra; the report does not
            print("per-class report: needs scikit-learn (pip install 'rlhf[embeddings]')")
        else:
            print(format_report(report))
    if args.out:
        try:
            write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        except OSError as exc:  # what `output_file` cannot foresee (a full disk, a read-only mount)
            print(f"error: --out {args.out}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
    return 0


def _classify(classifier: Any, mode: str, rows: list[dict]) -> tuple[str, str, Sequence[str], list[str]]:
    """(prediction column, gold column, classes, predictions) for prompt rows or (prompt, completion) rows."""
    prompts = [r["prompt"] for r in rows]
    if mode == "prompts":
        pred = call_checked(classifier, "classify_prompts", (prompts,), len(rows), PROMPT_CLASSES)
        return "predicted_category", "category", PROMPT_CLASSES, pred
    completions = [r["completion"] for r in rows]
    categories = [r.get("category") for r in rows]
    prompt_classes, pred, _ = classify_pairs(classifier, prompts, completions, categories)
    for row, pc in zip(rows, prompt_classes, strict=True):
        row["prompt_class"] = pc
    return "predicted_label", "label", COMPLETION_CLASSES, pred

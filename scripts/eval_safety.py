"""Measure safety classifiers on the hand-labelled sets; prints JSON.

    HF_HUB_OFFLINE=1 python -m scripts.eval_safety [--configs configs/safety/rules.yaml ...]
        [--prompts data/safety/labelled_prompts.jsonl] [--completions data/safety/labelled_completions.jsonl]
        [--heldout-prompts data/safety/heldout_prompts.jsonl]
        [--heldout-completions data/safety/heldout_completions.jsonl] [--folds 5] [--seed 0] [--misses]
    HF_HUB_OFFLINE=1 python -m scripts.eval_safety --tune [--configs configs/safety/embedding.yaml]

Two sets, two protocols:
- labelled (data/safety/labelled_*.jsonl): the set the backends were built on. Rows without a `source`
  are the ones the `rules` rubric was written on; rows with `source: heldout-v1` / `heldout-v2` were the
  first and second held-out sets (each measured once, then folded in as training examples when the next
  held-out set was written) and rows with `source: added-2026-12` were written as more training examples.
  `rules` is measured on all of them (in-sample for the first 147 prompts and 69 completions). An
  `embedding` config whose `examples_path` lists a labelled file is measured by stratified k-fold
  cross-validation: each fold is classified with that file's other folds as examples (plus the config's own
  examples), never with itself.
- held-out (data/safety/heldout_*.jsonl, 108 prompts and 50 completions; the third such set): written by hand
  after the labelled set with different topics and wording, committed before any tuning, and never used to
  choose a pattern, example or parameter. Classified by the configured backend as it ships (all examples).

Per set: precision / recall per prompt class, the share of allowed (and of sensitive) prompts flagged
disallowed, and completion-class accuracy (prompt classes from the dataset's category, as in training) with
per-class figures. `summary` condenses these; `target` says which backend meets "disallowed recall >= 0.9 with
at most 0.1 of allowed prompts flagged disallowed" on the held-out set.

`--tune` sweeps the embedding decision rule (similarity: knn_k, centroid_weight; logistic: logistic_l2,
lexical_weight; both:
center_embeddings and the disallowed margin)
by repeated stratified k-fold CV on the labelled set only (the held-out files are not read) and prints the
grid and the setting it picks: the smallest shortfall from the target, then the most room on the target's
tighter side (min(recall - 0.9, 0.1 - flagged)), then the higher prompt accuracy.
(Run from the repository root with `-m`, or with the package installed, so `rlhf` imports.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from rlhf.safety import (
    COMPLETION_CLASSES,
    PROMPT_CLASSES,
    EmbeddingClassifier,
    RulesClassifier,
    SafetyConfig,
    build_classifier,
    classification_report,
    classify_pairs,
    load_examples,
    read_labelled,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "safety"
TARGET_RECALL, TARGET_FLAGGED = 0.9, 0.1


class CachedEncoder:
    """Memoises a sentence encoder per text, so cross-validation folds never re-encode."""

    def __init__(self, encoder: Any):
        self.encoder, self.cache = encoder, {}

    def encode(self, texts, batch_size=32, show_progress_bar=False):
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            out = np.asarray(self.encoder.encode(todo, batch_size=batch_size, show_progress_bar=False))
            self.cache.update(zip(todo, out, strict=True))
        return np.stack([self.cache[t] for t in texts])


def stratified_folds(labels: list[str], k: int, seed: int) -> list[int]:
    """Fold index per row from scikit-learn's shuffled (seeded) StratifiedKFold: each class spread over k folds."""
    folds = [0] * len(labels)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        for i in test:
            folds[i] = fold
    return folds


def prompt_metrics(gold: list[str], pred: list[str]) -> dict[str, Any]:
    report = classification_report(gold, pred, PROMPT_CLASSES)

    def flagged(cls: str) -> float | None:
        n = gold.count(cls)
        return sum(g == cls and p == "disallowed" for g, p in zip(gold, pred, strict=True)) / n if n else None

    return {
        "n": report["n"],
        "accuracy": report["accuracy"],
        "per_class": report["per_class"],
        "allowed_flagged_disallowed": flagged("allowed"),
        "sensitive_flagged_disallowed": flagged("sensitive"),
        "confusion": report["confusion"],
    }


def completion_metrics(gold: list[str], pred: list[str]) -> dict[str, Any]:
    report = classification_report(gold, pred, COMPLETION_CLASSES)
    return {k: report[k] for k in ("n", "accuracy", "per_class", "confusion")}


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _merge(*dicts: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in dicts:
        for c, texts in d.items():
            out.setdefault(c, []).extend(texts)
    return out


def _predict_completions(clf, rows: list[dict]) -> list[str]:
    _, pred, _ = classify_pairs(
        clf, [r["prompt"] for r in rows], [r["completion"] for r in rows], [r["category"] for r in rows]
    )
    return pred


def labelled_predictions(
    clf, config: SafetyConfig, sets: dict, prompts_path: Path, completions_path: Path, k: int, seed: int
) -> tuple[list[str], list[str], dict[str, str]]:
    """Predictions on the labelled set with the right protocol for the backend (see the module doc)."""
    prompt_rows, completion_rows = sets["prompts"], sets["completions"]
    if isinstance(clf, RulesClassifier):
        note = "in-sample: the rubric was written on this set (its rows without a `source`)"
        return (
            clf.classify_prompts([r["prompt"] for r in prompt_rows]),
            _predict_completions(clf, completion_rows),
            {"prompts": note, "completions": note},
        )
    if not isinstance(clf, EmbeddingClassifier):
        note = "zero-shot: no examples from this set"
        return (
            clf.classify_prompts([r["prompt"] for r in prompt_rows]),
            _predict_completions(clf, completion_rows),
            {"prompts": note, "completions": note},
        )
    others = [p for p in config.examples_paths if not (_same(p, prompts_path) or _same(p, completions_path))]
    base = _merge(config.examples, *(load_examples(p) for p in others))
    uses_p = any(_same(p, prompts_path) for p in config.examples_paths)
    uses_c = any(_same(p, completions_path) for p in config.examples_paths)
    p_examples = load_examples(str(prompts_path)) if uses_p else {}
    c_examples = load_examples(str(completions_path)) if uses_c else {}

    def rows_as_examples(rows: list[dict], kind: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in rows:
            text, label = (r["prompt"], r["category"]) if kind == "prompt" else (r["completion"], r["label"])
            out.setdefault(label, []).append(text)
        return out

    def run(rows, kind, uses, other_examples, gold_key, predict):
        if not uses:
            return predict(
                clf.with_examples(_merge(base, other_examples)), rows
            ), "examples disjoint from this set"
        folds = stratified_folds([r[gold_key] for r in rows], k, seed)
        pred: list[str | None] = [None] * len(rows)
        for f in range(k):
            train = [r for r, g in zip(rows, folds, strict=True) if g != f]
            test_idx = [i for i, g in enumerate(folds) if g == f]
            fold_clf = clf.with_examples(_merge(base, other_examples, rows_as_examples(train, kind)))
            for i, label in zip(test_idx, predict(fold_clf, [rows[i] for i in test_idx]), strict=True):
                pred[i] = label
        return pred, f"{k}-fold stratified cross-validation (seed {seed}); the other folds are the examples"

    p_pred, p_note = run(
        prompt_rows,
        "prompt",
        uses_p,
        c_examples,
        "category",
        lambda c, rows: c.classify_prompts([r["prompt"] for r in rows]),
    )
    c_pred, c_note = run(completion_rows, "completion", uses_c, p_examples, "label", _predict_completions)
    return p_pred, c_pred, {"prompts": p_note, "completions": c_note}


def evaluate(config_path: Path, sets: dict, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    config = SafetyConfig.from_yaml(config_path)
    clf = build_classifier(config)
    if isinstance(clf, EmbeddingClassifier):
        clf.encoder = CachedEncoder(clf.encoder)
    result: dict[str, Any] = {"config": str(config_path), "name": config_path.stem, "classifier": clf.name}
    for name in ("labelled", "heldout"):
        if name not in sets:
            continue
        rows = sets[name]
        if name == "labelled":
            p_pred, c_pred, protocol = labelled_predictions(
                clf, config, rows, args.prompts, args.completions, args.folds, args.seed
            )
        else:
            p_pred = clf.classify_prompts([r["prompt"] for r in rows["prompts"]])
            c_pred = _predict_completions(clf, rows["completions"])
            note = "held-out: frozen before tuning, never used to choose anything; backend as configured"
            protocol = {"prompts": note, "completions": note}
        p_gold = [r["category"] for r in rows["prompts"]]
        c_gold = [r["label"] for r in rows["completions"]]
        entry = {
            "protocol": protocol,
            "prompts": prompt_metrics(p_gold, p_pred),
            "completions": completion_metrics(c_gold, c_pred),
        }
        if args.misses:
            entry["prompt_misses"] = [
                {"prompt": r["prompt"], "gold": g, "pred": p}
                for r, g, p in zip(rows["prompts"], p_gold, p_pred, strict=True)
                if g != p
            ]
            entry["completion_misses"] = [
                {"completion": r["completion"][:100], "gold": g, "pred": p}
                for r, g, p in zip(rows["completions"], c_gold, c_pred, strict=True)
                if g != p
            ]
        result[name] = entry
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def summarise(results: list[dict]) -> tuple[list[dict], dict]:
    rows = []
    for r in results:
        for name in ("labelled", "heldout"):
            if name not in r:
                continue
            p, c = r[name]["prompts"], r[name]["completions"]
            rows.append(
                {
                    "classifier": r["classifier"],
                    "config": r["name"],
                    "set": name,
                    "protocol": r[name]["protocol"]["prompts"].split(":")[0].split(";")[0],
                    "disallowed_recall": p["per_class"]["disallowed"]["recall"],
                    "disallowed_precision": p["per_class"]["disallowed"]["precision"],
                    "allowed_flagged_disallowed": p["allowed_flagged_disallowed"],
                    "sensitive_flagged_disallowed": p["sensitive_flagged_disallowed"],
                    "prompt_accuracy": p["accuracy"],
                    "completion_accuracy": c["accuracy"],
                }
            )
    held = [s for s in rows if s["set"] == "heldout"]
    meets = [
        s["config"]
        for s in held
        if (s["disallowed_recall"] or 0) >= TARGET_RECALL
        and (s["allowed_flagged_disallowed"] or 0) <= TARGET_FLAGGED
    ]
    # Best: meets the target with the highest recall minus flagged; else the smallest shortfall.
    best = None
    if held:

        def key(s):
            shortfall = max(0.0, TARGET_RECALL - s["disallowed_recall"]) + max(
                0.0, s["allowed_flagged_disallowed"] - TARGET_FLAGGED
            )
            return (shortfall, -(s["disallowed_recall"] - s["allowed_flagged_disallowed"]))

        best = min(held, key=key)["config"]
    target = {
        "rule": f"held-out prompts: disallowed recall >= {TARGET_RECALL} "
        f"and allowed flagged disallowed <= {TARGET_FLAGGED}",
        "met_by": meets,
        "best_backend_on_heldout": best,
        "met": bool(meets),
    }
    return rows, target


# ------------------------------------------------------------------------------------------------- tuning


def pick_order(row: dict) -> tuple[float, ...]:
    """Sort key of a tuning row, best first. Meeting the target comes first; then the most room on its tighter
    side (so a held-out set, which always differs from the CV folds, is least likely to tip it over); then
    accuracy."""
    return (row["shortfall"], -row["room"], -row["prompt_accuracy"], -row["completion_accuracy"])


def tune(config_path: Path, sets: dict, args: argparse.Namespace) -> dict:
    """Grid over the embedding decision rule by repeated stratified k-fold CV on the labelled prompts only."""
    config = SafetyConfig.from_yaml(config_path)
    clf = build_classifier(config)
    if not isinstance(clf, EmbeddingClassifier):
        raise SystemExit(f"--tune needs an embedding config, got {clf.name!r} from {config_path}")
    clf.encoder = CachedEncoder(clf.encoder)
    others = [p for p in config.examples_paths if not (_same(p, args.prompts) or _same(p, args.completions))]
    base = _merge(config.examples, *(load_examples(p) for p in others))
    rows = sets["labelled"]["prompts"]
    texts, gold = [r["prompt"] for r in rows], [r["category"] for r in rows]
    c_rows = sets["labelled"]["completions"]
    seeds = list(range(args.seed, args.seed + args.tune_repeats))
    similarity_margins = [round(0.01 * i, 2) for i in range(0, 9)]
    logistic_margins = [round(0.125 * i, 3) for i in range(0, 17)]  # log-probability units
    # Similarity rules were dominated by logistic ones in every sweep so far, so their grid is kept small.
    candidates = [
        dict(rule="similarity", knn_k=k, centroid_weight=w if k else 1.0, center=c, l2=None, lex=0.0)
        for k, w, c in itertools.product([0, 7, 10], [0.25, 0.5], [False, True])
        if k or w == 0.25  # nearest centroid has no weight to set
    ] + [
        dict(rule="logistic", knn_k=0, centroid_weight=1.0, center=c, l2=l2, lex=lex)
        for l2, c, lex in itertools.product([0.0001, 0.0003, 0.001], [False, True], [0.0, 1.0, 1.5, 2.0])
    ]
    grid = []
    for cand in candidates:
        proto = EmbeddingClassifier(
            None,
            clf.prompt_labels,
            clf.completion_labels,
            {},
            encoder=clf.encoder,
            knn_k=cand["knn_k"],
            centroid_weight=cand["centroid_weight"],
            center=cand["center"],
            rule=cand["rule"],
            l2=cand["l2"] or 0.01,
            lexical_weight=cand["lex"],
        )
        proto._example_embeddings = clf._example_embeddings
        margins = logistic_margins if cand["rule"] == "logistic" else similarity_margins
        per_margin = {m: [] for m in margins}
        for seed in seeds:
            folds = stratified_folds(gold, args.folds, seed)
            scores = np.zeros((len(rows), len(PROMPT_CLASSES)))
            for f in range(args.folds):
                train: dict[str, list[str]] = {}
                for t, g, fo in zip(texts, gold, folds, strict=True):
                    if fo != f:
                        train.setdefault(g, []).append(t)
                idx = [i for i, fo in enumerate(folds) if fo == f]
                classes, s = proto.with_examples(_merge(base, train)).scores(
                    [texts[i] for i in idx], "prompt"
                )
                order = [classes.index(c) for c in PROMPT_CLASSES]
                scores[idx] = s[:, order]
            for m in margins:
                shifted = scores + np.array([0.0, 0.0, m])
                pred = [PROMPT_CLASSES[i] for i in shifted.argmax(axis=1)]
                per_margin[m].append(prompt_metrics(gold, pred))
        # completion accuracy by CV for the same (knn_k, weight, center), margins not applied
        c_accs = []
        for seed in seeds:
            folds = stratified_folds([r["label"] for r in c_rows], args.folds, seed)
            pred: list[str | None] = [None] * len(c_rows)
            for f in range(args.folds):
                train_c: dict[str, list[str]] = {}
                for r, fo in zip(c_rows, folds, strict=True):
                    if fo != f:
                        train_c.setdefault(r["label"], []).append(r["completion"])
                idx = [i for i, fo in enumerate(folds) if fo == f]
                fold_clf = proto.with_examples(_merge(base, train_c))
                for i, label in zip(
                    idx, _predict_completions(fold_clf, [c_rows[i] for i in idx]), strict=True
                ):
                    pred[i] = label
            c_accs.append(completion_metrics([r["label"] for r in c_rows], pred)["accuracy"])
        for m, ms in per_margin.items():
            recall = float(np.mean([x["per_class"]["disallowed"]["recall"] for x in ms]))
            flagged = float(np.mean([x["allowed_flagged_disallowed"] for x in ms]))
            grid.append(
                {
                    "embedding_rule": cand["rule"],
                    "logistic_l2": cand["l2"],
                    "lexical_weight": cand["lex"],
                    "knn_k": cand["knn_k"],
                    "centroid_weight": cand["centroid_weight"],
                    "center_embeddings": cand["center"],
                    "disallowed_margin": m,
                    "disallowed_recall": round(recall, 4),
                    "allowed_flagged": round(flagged, 4),
                    "sensitive_flagged": round(
                        float(np.mean([x["sensitive_flagged_disallowed"] for x in ms])), 4
                    ),
                    "prompt_accuracy": round(float(np.mean([x["accuracy"] for x in ms])), 4),
                    "completion_accuracy": round(float(np.mean(c_accs)), 4),
                    "shortfall": round(
                        max(0.0, TARGET_RECALL - recall) + max(0.0, flagged - TARGET_FLAGGED), 4
                    ),
                    "room": round(min(recall - TARGET_RECALL, TARGET_FLAGGED - flagged), 4),
                }
            )
    grid.sort(key=pick_order)
    return {
        "config": str(config_path),
        "protocol": f"{args.folds}-fold stratified CV x {len(seeds)} seeds on {args.prompts.name} "
        f"and {args.completions.name} only",
        "picked": grid[0],
        "top": grid[:15],
        "grid_size": len(grid),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        type=Path,
        default=[
            ROOT / "configs/safety/rules.yaml",
            ROOT / "configs/safety/embedding_knn.yaml",
            ROOT / "configs/safety/embedding.yaml",
        ],
    )
    parser.add_argument("--prompts", type=Path, default=DATA / "labelled_prompts.jsonl")
    parser.add_argument("--completions", type=Path, default=DATA / "labelled_completions.jsonl")
    parser.add_argument("--heldout-prompts", type=Path, default=DATA / "heldout_prompts.jsonl")
    parser.add_argument("--heldout-completions", type=Path, default=DATA / "heldout_completions.jsonl")
    parser.add_argument("--no-heldout", action="store_true", help="labelled set only")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (embedding)")
    parser.add_argument("--seed", type=int, default=0, help="fold shuffling seed")
    parser.add_argument("--misses", action="store_true", help="also list the misclassified rows")
    parser.add_argument(
        "--tune", action="store_true", help="sweep the embedding decision rule by CV (labelled only)"
    )
    parser.add_argument("--tune-repeats", type=int, default=5, help="CV repetitions (seeds) when tuning")
    args = parser.parse_args()
    sets = {
        "labelled": {
            "prompts": read_labelled(args.prompts)[1],
            "completions": read_labelled(args.completions)[1],
        }
    }
    if args.tune:
        configs = [c for c in args.configs if SafetyConfig.from_yaml(c).classifier == "embedding"]
        print(json.dumps([tune(c, sets, args) for c in configs], indent=2))
        return
    if not args.no_heldout:
        sets["heldout"] = {
            "prompts": read_labelled(args.heldout_prompts)[1],
            "completions": read_labelled(args.heldout_completions)[1],
        }
    results = [evaluate(c, sets, args) for c in args.configs]
    summary, target = summarise(results)
    print(json.dumps({"summary": summary, "target": target, "results": results}, indent=2))


if __name__ == "__main__":
    main()

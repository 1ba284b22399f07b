"""Compare two reward-model settings block by block, seed for seed: the figures behind the README's fold table.

    python -m scripts.compare_folds BASELINE.jsonl OTHER.jsonl [--selection_fold 5] [--effect 0.01]

Each file holds one result per line, as `python -m scripts.eval_minilm_reward --fold K --results FILE` appends
them (only `fold`, `seed`, `eval_pairs` and `eval_accuracy` are read). The selection fold, the split settings were
chosen on, is reported apart: only the other folds estimate a setting without that selection's bias, and only they
enter the paired comparison. A run wins or loses by its count of correct pairs, so equal counts tie.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from rlhf.data import DataError, Problem, read_records

FIELDS = ("fold", "seed", "eval_pairs", "eval_accuracy")


def load_results(path: str) -> dict[tuple[int, int], tuple[int, int]]:
    """(fold, seed) -> (correct pairs, eval pairs) for every run in a results file; every bad line is a `DataError`
    problem at PATH:LINE, read through the data module's reader."""
    problems: list[Problem] = []
    runs: dict[tuple[int, int], tuple[int, int]] = {}
    for record in read_records(path, problems):
        row = record.row
        bad = [f for f in FIELDS if isinstance(row.get(f), bool) or not isinstance(row.get(f), (int, float))]
        key = (row.get("fold"), row.get("seed"))
        if bad:
            problems.append(
                Problem(path, record.line, f"{bad[0]}: expected a number, got {row.get(bad[0])!r}")
            )
        elif row["eval_pairs"] < 1:
            problems.append(
                Problem(path, record.line, f"eval_pairs: expected at least 1, got {row['eval_pairs']!r}")
            )
        elif key in runs:
            problems.append(
                Problem(path, record.line, f"fold {key[0]}, seed {key[1]}: already on an earlier line")
            )
        else:
            runs[key] = (round(row["eval_accuracy"] * row["eval_pairs"]), row["eval_pairs"])
    if problems:
        raise DataError(problems)
    return runs


def accuracy(run: tuple[int, int]) -> float:
    correct, pairs = run
    return correct / pairs


def describe(runs: dict[tuple[int, int], tuple[int, int]], selection_fold: int) -> dict:
    """Mean accuracy over the unbiased folds, per seed and over all their runs; the selection fold's mean apart."""
    unbiased = {key: run for key, run in runs.items() if key[0] != selection_fold}
    seeds = sorted({seed for _, seed in unbiased})
    selected = [accuracy(run) for (fold, _), run in runs.items() if fold == selection_fold]
    return {
        "unbiased_folds": sorted({fold for fold, _ in unbiased}),
        "by_seed": {
            seed: round(statistics.mean(accuracy(r) for (_, s), r in unbiased.items() if s == seed), 3)
            for seed in seeds
        },
        "mean": round(statistics.mean(map(accuracy, unbiased.values())), 3) if unbiased else None,
        "selection_fold_mean": round(statistics.mean(selected), 3) if selected else None,
    }


def paired(
    baseline: dict[tuple[int, int], tuple[int, int]],
    other: dict[tuple[int, int], tuple[int, int]],
    selection_fold: int,
    effect: float,
) -> dict:
    """Other minus baseline on each run both have outside the selection fold.

    The standard error of the mean difference is SD/sqrt(n); telling a true difference of `effect` from zero at two
    standard errors takes n = (2 SD / effect)^2 paired runs."""
    keys = sorted(key for key in baseline.keys() & other.keys() if key[0] != selection_fold)
    if len(keys) < 2:
        raise ValueError(f"only {len(keys)} run(s) outside fold {selection_fold} are in both files; need 2")
    differences = [accuracy(other[key]) - accuracy(baseline[key]) for key in keys]
    signs = [(other[key][0] > baseline[key][0]) - (other[key][0] < baseline[key][0]) for key in keys]
    sd = statistics.stdev(differences)
    return {
        "runs": len(keys),
        "won": signs.count(1),
        "tied": signs.count(0),
        "lost": signs.count(-1),
        "mean_difference": round(statistics.mean(differences), 4),
        "sd": round(sd, 4),
        "se": round(sd / math.sqrt(len(keys)), 4),
        "effect": effect,
        "runs_to_resolve_effect": math.ceil((2 * sd / effect) ** 2),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baseline")
    parser.add_argument("other")
    parser.add_argument(
        "--selection_fold", type=int, default=5, help="The fold settings were chosen on (the shipped split)."
    )
    parser.add_argument(
        "--effect", type=float, default=0.01, help="The accuracy difference to size the runs needed for."
    )
    args = parser.parse_args(argv)
    if not args.effect > 0:
        print(f"error: --effect: expected a positive accuracy difference, got {args.effect}", file=sys.stderr)
        return 2
    try:
        baseline, other = load_results(args.baseline), load_results(args.other)
        comparison = paired(baseline, other, args.selection_fold, args.effect)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {
        "baseline": {"path": args.baseline, **describe(baseline, args.selection_fold)},
        "other": {"path": args.other, **describe(other, args.selection_fold)},
        "paired": comparison,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

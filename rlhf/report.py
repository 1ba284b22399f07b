"""The pipeline's report: `report.json`, `report.md` and PNG plots (training curves, SFT-versus-PPO bars).

The report is honest: every evaluation metric gets a verdict, and a metric PPO did not improve is said to be so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rlhf.checkpoint import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# metric -> True when higher is better
VERDICT_METRICS = {
    "gold_score": True,
    "rm_score": True,
    "disallowed_compliance_rate": False,
    "allowed_refusal_rate": False,
    "over_refusal_rate_sensitive": False,
    "eos_rate": True,
}
BAR_METRICS = ("gold_score", "rm_score", "disallowed_compliance_rate", "allowed_refusal_rate", "eos_rate")


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def training_curves(out: Path) -> dict[str, dict[str, list]]:
    """Per-stage series: SFT loss, reward-model loss/accuracy, PPO reward, KL and entropy."""
    sft = read_json(out / "sft" / "log_history.json", [])
    rm = read_json(out / "reward" / "log_history.json", [])
    ppo_path = out / "ppo" / "history.jsonl"
    ppo = [json.loads(line) for line in ppo_path.read_text().splitlines()] if ppo_path.exists() else []
    series = lambda rows, key: [(r.get("step", i + 1), r[key]) for i, r in enumerate(rows) if key in r]  # noqa: E731
    return {
        "sft": {"loss": series(sft, "loss")},
        "reward": {"loss": series(rm, "loss"), "accuracy": series(rm, "accuracy")},
        "ppo": {
            "reward": [(i + 1, r["reward/total"]) for i, r in enumerate(ppo)],
            "kl": [(i + 1, r["objective/kl"]) for i, r in enumerate(ppo)],
            "entropy": [(i + 1, r.get("policy/entropy", 0.0)) for i, r in enumerate(ppo)],
        },
    }


def verdicts(sft: dict[str, Any], ppo: dict[str, Any]) -> dict[str, str]:
    out = {}
    for metric, higher_is_better in VERDICT_METRICS.items():
        before, after = sft.get(metric), ppo.get(metric)
        if before is None or after is None:
            continue
        if after == before:
            out[metric] = "unchanged"
        else:
            better = (after > before) == higher_is_better
            out[metric] = "improved" if better else "NOT improved (worse after PPO)"
    return out


def plot(
    curves: dict[str, dict[str, list]], sft: dict[str, Any], ppo: dict[str, Any], out: Path
) -> list[str]:
    """The PNG files written (none without matplotlib, the `report` extra: the report is kept without them)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'rlhf[report]'): the report has no plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = [("sft", "loss"), ("reward", "accuracy"), ("ppo", "reward"), ("ppo", "kl"), ("ppo", "entropy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (stage, key) in zip(axes, panels, strict=True):
        points = curves[stage][key]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(f"{stage}: {key}")
        ax.set_xlabel("step" if stage != "ppo" else "update")
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=90)
    files.append("training_curves.png")
    plt.close(fig)

    metrics = [m for m in BAR_METRICS if sft.get(m) is not None and ppo.get(m) is not None]
    fig, ax = plt.subplots(figsize=(1.8 * max(1, len(metrics)) + 2, 3.5))
    xs = range(len(metrics))
    ax.bar([x - 0.2 for x in xs], [sft[m] for m in metrics], width=0.4, label="SFT")
    ax.bar([x + 0.2 for x in xs], [ppo[m] for m in metrics], width=0.4, label="PPO")
    ax.set_xticks(list(xs), metrics, rotation=20, ha="right")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    ax.set_title("evaluation: SFT vs PPO")
    fig.tight_layout()
    fig.savefig(out / "eval_bars.png", dpi=90)
    files.append("eval_bars.png")
    plt.close(fig)
    return files


def markdown(report: dict[str, Any]) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    sft, ppo = report["eval"]["sft"], report["eval"]["ppo"]
    lines = [
        "# RLHF pipeline report",
        "",
        "## Stages",
        "",
        "| stage | wall seconds | skipped |",
        "|---|---|---|",
    ]
    for stage, info in report["stages"].items():
        lines.append(f"| {stage} | {fmt(info.get('wall_seconds'))} | {info.get('skipped', False)} |")
    lines += [
        "",
        "## Evaluation (held-out prompts)",
        "",
        "| metric | SFT | PPO | verdict |",
        "|---|---|---|---|",
    ]
    keys = [k for k in ppo if isinstance(ppo.get(k), (int, float)) and not isinstance(ppo.get(k), bool)]
    for key in keys:
        lines.append(
            f"| {key} | {fmt(sft.get(key))} | {fmt(ppo.get(key))} | {report['verdicts'].get(key, '')} |"
        )
    sft_groups, ppo_groups = sft.get("gold_score_by_category") or {}, ppo.get("gold_score_by_category") or {}
    if ppo_groups:
        lines += ["", "Gold score by prompt category:", "", "| category | SFT | PPO |", "|---|---|---|"]
        lines += [f"| {c} | {fmt(sft_groups.get(c))} | {fmt(v)} |" for c, v in ppo_groups.items()]
    worse = [k for k, v in report["verdicts"].items() if v.startswith("NOT")]
    lines += [
        "",
        "PPO did not improve: " + ", ".join(worse) if worse else "PPO improved or kept every tracked metric.",
    ]
    lines += inspect_lines(report.get("inspect"))
    captions = {"training_curves.png": "training curves", "eval_bars.png": "SFT vs PPO"}
    for file in report.get("plots", []):
        lines += ["", f"![{captions.get(file, file)}]({file})"]
    lines += ["", "## Samples", ""]
    lines += ["| category | prompt | SFT | PPO |", "|---|---|---|---|"]
    clean = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for sample in report["samples"]:
        lines.append(
            f"| {sample.get('category')} | {clean(sample['prompt'])} | {clean(sample.get('reference', ''))} | "
            f"{clean(sample.get('policy', ''))} |"
        )
    return "\n".join(lines) + "\n"


def inspect_lines(inspect: dict[str, Any] | None) -> list[str]:
    """The link to the SFT-vs-PPO inspect page, with each category's unit whose direct effect changed most."""
    if not inspect:
        return []
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731  (explanations quote tokens such as <|end|>)
    lines = [
        "",
        "## Inside the model",
        "",
        f"[What PPO changed inside the model]({inspect['page']}) (`rlhf inspect diff` on the first "
        f"{inspect['per_category']} held-out prompts of each category): per category, the neuron and the head "
        "whose direct effect on PPO's answers changed most (logits per answer token), explained in the PPO model.",
        "",
        "| category | unit | direct effect SFT → PPO | explanation (score) |",
        "|---|---|---|---|",
    ]
    for category, units in inspect["top"].items():
        for row in units.values():
            lines.append(
                f"| {category} | {row['unit']} | {row['effect_before']:+.3f} → {row['effect_after']:+.3f} | "
                f"{cell(row['explanation_after'])} ({row['score_after']:.2f}) |"
            )
    return lines


def write_report(config, stages: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """report.json, report.md and the plots from the stages' timings and the evaluation's `results`."""
    out = Path(config.output_dir)
    sft, ppo = results["reference"], results["policy"]
    report = {
        "stages": stages,
        "eval": {"sft": sft, "ppo": ppo},
        "verdicts": verdicts(sft, ppo),
        "samples": results["samples"],
        "seed": config.seed,
        "inspect": results.get("inspect"),
    }
    report["plots"] = plot(training_curves(out), sft, ppo, out)
    # Each file whole or not at all: a report half-written by a crash must not pass for a finished one.
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    return report

"""Our PPO against TRL 1.12's `trl.experimental.ppo.PPOTrainer` and the bare-compute limit, in two configurations.

    HF_HUB_OFFLINE=1 python benchmarks/compare_trl.py                       # both configurations + the sweep
    HF_HUB_OFFLINE=1 python benchmarks/compare_trl.py --config realistic    # answers that end at EOS only
    HF_HUB_OFFLINE=1 python benchmarks/compare_trl.py --quick               # 1 round + a 2-point sweep
    HF_HUB_OFFLINE=1 python benchmarks/compare_trl.py --device cuda         # bf16 autocast, SDPA, on a GPU

TRL 1.12.0 is the newest TRL with a PPO trainer; it lives in its own virtualenv, benchmarks/.venv-trl112
(git-ignored), created on first use with `pip install trl==1.12.0 torch==2.13.0` (pip resolves transformers to
the newest release trl 1.12 accepts, `transformers>=4.56.2`; the versions used are recorded in the JSON).

The configurations (common.Setup):
- fixed: 8 prompts, 48 tokens always sampled (ours: `always_full_length`; TRL: `stop_token=None`), one micro-batch
  of 8. Every answer has the same length, so there is no padding to save.
- realistic (common.REALISTIC): 16 prompts, answers that end at EOS (ours: generation stops at EOS; TRL:
  `stop_token="eos"`), at most 256 tokens, from a policy that ends an answer at each step with probability 1/64
  (geometric lengths, mean about 64; common.write_eos_policy); micro-batches of 4, accumulated into one optimizer
  step per epoch (TRL: `per_device_train_batch_size=4`, `gradient_accumulation_steps=4`). The answer lengths of
  every timed update are recorded and summarised with the figures.

In both, the two loops and the limit get the same weights, tokenizer and prompt token ids (common.prepare), the
same four models (policy, frozen reference, value = policy backbone + fresh scalar head, reward = a same-size
sequence classifier: ours reads it through its `reward_model` source, i.e. decode + chat template + re-tokenise +
forward; TRL scores the token ids directly), the same prompts every update, temperature 0.7, 4 epochs over 1
minibatch (TRL: `num_mini_batches=1`, generation in one call: `local_rollout_forward_batch_size` = prompts),
the same missing-EOS penalty (1 subtracted), fp32 on a CPU (TRL: `bf16=False`) and bf16 autocast on a GPU, no
gradient checkpointing (TRL's default is on: turned off so both do the same compute), the same learning rate /
AdamW eps / weight decay 0 and thread count. Each run is its own process (so ru_maxrss is that implementation's
peak); runs alternate ours, TRL, limit per round. Per-update times exclude start-up: `warmup` updates are run
first and dropped.

Writes compare_trl.{json,png} and compare_trl_sweep.png (fixed: seconds per update as the response length and
the prompts per update grow), and compare_trl_realistic.{json,png} (with the answer-length histogram).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    REALISTIC,
    RESULTS,
    OtherLoad,
    Setup,
    load_average,
    median,
    prepare,
    wait_until_idle,
)

TRL_VENV = HERE / ".venv-trl112"
TRL_REQUIREMENTS = ["trl==1.12.0", "torch==2.13.0"]
SWEEP_LENGTHS = [32, 64, 128, 256]
SWEEP_PROMPTS = [4, 8, 16, 32]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, fewer updates, a 2-point sweep.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of (ours, TRL, limit) runs.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed updates at the start of each run.")
    parser.add_argument("--updates", type=int, default=5, help="Quiet timed updates per run.")
    parser.add_argument(
        "--max-updates", type=int, default=20, help="Per run, stop collecting quiet updates after this many."
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, both sides.")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        help="Before each run, wait up to this many s for other processes.",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="cuda: bf16 autocast and SDPA on every side."
    )
    parser.add_argument(
        "--config",
        default="both",
        choices=("fixed", "realistic", "both"),
        help="fixed: 8 prompts x 48 tokens always; realistic: 16 prompts, answers end at EOS, up to 256 tokens.",
    )
    parser.add_argument("--out-dir", default=str(RESULTS))
    # internal: one measured run in this (project) virtualenv
    parser.add_argument("--worker", choices=("ours", "limit"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.updates = 1, 1, 3
    return args


# --------------------------------------------------------------------------------------------------------------
# Workers: one process per measured run


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    from common import Limit, Ours, quiet_updates, summarise

    setup = Setup(**json.loads(args.setup))
    torch.set_num_threads(setup.threads)
    paths = prepare(setup)
    if args.worker == "ours":
        runner = Ours(setup, paths, tempfile.mkdtemp(prefix="ppo-cmp-"), args.warmup + args.max_updates + 1)
    else:
        runner = Limit(setup, paths)
    for _ in range(args.warmup):
        runner.step()
    records = quiet_updates(runner.step, args.updates, args.max_updates, setup.threads)
    result = {
        "impl": args.worker,
        **summarise(records),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    if setup.device == "cuda":
        result["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.out).write_text(json.dumps(result))


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != '1.12.0')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {TRL_VENV} with {' '.join(TRL_REQUIREMENTS)} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)
    subprocess.run(check, check=True)
    return python


def trl_versions(python: Path) -> dict[str, str]:
    code = (
        "import json; from importlib.metadata import version as v; "
        "print(json.dumps({p: v(p) for p in ('trl', 'transformers', 'torch', 'accelerate', 'datasets')}))"
    )
    return json.loads(
        subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    )


def run(
    impl: str,
    setup: Setup,
    warmup: int,
    updates: int,
    max_updates: int,
    trl_python: Path,
    wait_idle: float = 0,
) -> dict:
    """One measured run of `impl` in a fresh process; returns the worker's JSON."""
    paths = prepare(setup)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    if impl == "trl":
        command = [
            str(trl_python),
            str(HERE / "trl_worker.py"),
            *("--policy", paths["policy"], "--reward", paths["reward"], "--prompt-ids", paths["prompt_ids"]),
            *("--response-length", str(setup.response_length), "--epochs", str(setup.ppo_epochs)),
            *("--temperature", str(setup.temperature), "--learning-rate", str(setup.learning_rate)),
            *("--adam-eps", str(setup.adam_eps), "--kl-coef", str(setup.kl_coef)),
            *("--warmup", str(warmup), "--updates", str(updates), "--max-updates", str(max_updates)),
            *("--threads", str(setup.threads), "--micro-batch", str(setup.micro)),
            *(["--stop-at-eos"] if setup.stop_at_eos else []),
            *("--seed", str(setup.seed), "--device", setup.device, "--out", out),
        ]
    else:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *("--worker", impl, "--setup", json.dumps(asdict(setup))),
            *("--warmup", str(warmup), "--updates", str(updates), "--max-updates", str(max_updates)),
            *("--out", out),
        ]
    if wait_idle:
        wait_until_idle(wait_idle)
    started = time.perf_counter()
    with OtherLoad() as others:
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["load_average"] = round(load_average(), 2)
    result["other_processes_cores"] = others.cores
    print(
        f"  {impl:5s} prompts={setup.prompts:2d} length={setup.response_length:3d}: "
        f"{result['median']['update']:.3f} s/update, peak RSS {result['peak_rss_mib']:.0f} MiB "
        f"(run {result['wall_seconds']} s, others used {others.cores} cores)",
        file=sys.stderr,
        flush=True,
    )
    return result


def pooled(runs: list[dict]) -> dict:
    """Medians over every quiet timed update of every run of one implementation; peak memory: median over runs."""
    every = [r for run_ in runs for r in run_["per_update"]]
    updates = [r for r in every if r["quiet"]] or every
    keys = [
        k
        for k in updates[0]
        if k != "quiet" and isinstance(updates[0][k], (int, float)) and all(k in u for u in updates)
    ]
    out = {f"median_{k}": round(median([u[k] for u in updates]), 4) for k in keys}
    out["peak_rss_mib"] = round(median([r["peak_rss_mib"] for r in runs]), 1)
    out["quiet_updates"] = sum(r["quiet"] for r in every)
    out["timed_updates"] = len(every)
    out["other_processes_cores"] = [r["other_processes_cores"] for r in runs]
    out["run_medians"] = [r["median"]["update"] for r in runs]
    lengths = [n for r in updates for n in r.get("lengths", [])]
    if lengths:
        out["lengths"] = length_summary(lengths)
    return out


def length_summary(lengths: list[int]) -> dict:
    """Quantiles of the answer lengths (tokens up to and including EOS) and the raw list, for the histogram."""
    ordered = sorted(lengths)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "answers": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 1),
        **{
            name: q(p)
            for name, p in (("p10", 0.1), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p90", 0.9))
        },
        "min": ordered[0],
        "max": ordered[-1],
        "values": lengths,
    }


# --------------------------------------------------------------------------------------------------------------
# Comparison, sweep, plots


def compare(setup: Setup, args: argparse.Namespace, trl_python: Path) -> dict:
    runs: dict[str, list[dict]] = {"ours": [], "trl": [], "limit": []}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for impl in ("ours", "trl", "limit"):
            runs[impl].append(
                run(impl, setup, args.warmup, args.updates, args.max_updates, trl_python, args.wait_idle)
            )
    summary = {impl: pooled(r) for impl, r in runs.items()}
    summary["threads"], summary["device"] = setup.threads, setup.device
    ours, trl, limit = (summary[k]["median_update"] for k in ("ours", "trl", "limit"))
    summary["ratios"] = {
        "ours_over_trl": round(ours / trl, 3),
        "trl_over_ours": round(trl / ours, 3),
        "ours_over_limit": round(ours / limit, 3),
        "trl_over_limit": round(trl / limit, 3),
        "ours_rss_over_trl_rss": round(summary["ours"]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"], 3),
    }
    summary["valid"] = all(summary[k]["quiet_updates"] > 0 for k in ("ours", "trl", "limit"))
    summary["targets"] = {
        "ours_at_least_1.4x_faster_than_trl": trl / ours >= 1.4,
        "ours_at_most_1.10x_limit": ours / limit <= 1.10,
        "ours_peak_memory_not_above_trl": summary["ours"]["peak_rss_mib"] <= summary["trl"]["peak_rss_mib"],
    }
    if not summary["valid"]:
        # Medians over updates slowed by other processes compare the neighbours, not the trainers.
        summary["targets"] = {k: None for k in summary["targets"]}
        print("WARNING: some implementation had no quiet update; timings are not comparable", file=sys.stderr)
    summary["runs"] = runs
    return summary


def sweep(base: Setup, args: argparse.Namespace, trl_python: Path) -> dict:
    lengths = [32, 128] if args.quick else SWEEP_LENGTHS
    prompts = [4, 16] if args.quick else SWEEP_PROMPTS
    warmup, updates, max_updates = (1, 1, 4) if args.quick else (1, 2, 8)
    points = [("response_length", n, replace(base, response_length=n)) for n in lengths]
    points += [("prompts", n, replace(base, prompts=n)) for n in prompts]
    out: dict[str, dict[str, list]] = {
        axis: {"x": [], "ours": [], "trl": []} for axis in ("response_length", "prompts")
    }
    for axis, value, setup in points:
        out[axis]["x"].append(value)
        for impl in ("ours", "trl"):
            result = run(impl, setup, warmup, updates, max_updates, trl_python, args.wait_idle)
            out[axis][impl].append(result["median"]["update"])
    return out


def plot(summary: dict, sweep_result: dict | None, out_dir: Path, suffix: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, colors = ["ours", "trl", "limit"], ["tab:blue", "tab:orange", "tab:gray"]
    labels = ["ours", "TRL 1.12", "bare limit"]
    panels = [
        ("median_update", "seconds per update (lower is better)"),
        ("median_tokens_per_second", "generated tokens / s of update (higher is better)"),
        ("peak_rss_mib", "peak RSS, MiB (lower is better)"),
    ]
    lengths = summary["limit"].get("lengths")
    if lengths and lengths["min"] == lengths["max"]:
        lengths = None  # every answer ran the full length: nothing to draw
    fig, axes = plt.subplots(1, 3 + bool(lengths), figsize=(13 + 4 * bool(lengths), 4))
    for ax, (key, panel) in zip(axes, panels, strict=False):
        values = [summary[n][key] for n in names]
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(panel, fontsize=10)
    if lengths:
        axes[-1].hist(lengths["values"], bins=32, color="tab:gray")
        axes[-1].set_title(
            f"answer lengths, tokens (median {lengths['median']}, mean {lengths['mean']})", fontsize=10
        )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    paths = [str(out_dir / f"compare_trl{suffix}.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    if sweep_result:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (axis, xlabel) in zip(
            axes,
            [
                ("response_length", "response tokens (8 prompts)"),
                ("prompts", "prompts per update (48 tokens)"),
            ],
            strict=True,
        ):
            data = sweep_result[axis]
            for impl, color, label in (("ours", "tab:blue", "ours"), ("trl", "tab:orange", "TRL 1.12")):
                ax.plot(data["x"], data[impl], "o-", color=color, label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(data["x"], [str(x) for x in data["x"]])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("seconds per update")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        paths.append(str(out_dir / f"compare_trl_sweep{suffix}.png"))
        fig.savefig(paths[1], dpi=110)
        plt.close(fig)
    return paths


def measure(name: str, setup: Setup, args: argparse.Namespace, trl_python: Path, with_sweep: bool) -> dict:
    """Compare (and sweep) one configuration; write compare_trl[_NAME][_quick].{json,png}."""
    out_dir = Path(args.out_dir)
    started, load_before = time.perf_counter(), load_average()
    print(f"configuration: {name}", file=sys.stderr, flush=True)
    summary = compare(setup, args, trl_python)
    sweep_result = sweep(setup, args, trl_python) if with_sweep else None
    result = {
        "benchmark": "compare_trl",
        "configuration": name,
        "setup": asdict(setup),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "updates_per_run": args.updates,
        "quick": args.quick,
        "trl_env": trl_versions(trl_python),
        "load_average": [round(load_before, 2), round(load_average(), 2)],
        **summary,
        "sweep": sweep_result,
    }
    suffix = ("" if name == "fixed" else f"_{name}") + ("_quick" if args.quick else "")
    result["plots"] = plot(summary, sweep_result, out_dir, suffix, describe(setup))
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / f"compare_trl{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    printed = {k: v for k, v in result.items() if k not in ("runs",)}
    for impl in ("ours", "trl", "limit"):
        printed[impl] = {k: v for k, v in summary[impl].items() if k != "lengths"}
    print(json.dumps(printed, indent=1))
    r = summary["ratios"]
    print(
        f"{name}: ours/trl = {r['ours_over_trl']} (TRL/ours = {r['trl_over_ours']}x), "
        f"ours/limit = {r['ours_over_limit']}, peak RSS ours/trl = {r['ours_rss_over_trl_rss']}"
    )
    if "lengths" in summary["limit"]:
        lengths = {k: v for k, v in summary["limit"]["lengths"].items() if k != "values"}
        print(f"{name}: answer lengths (limit's timed updates) {lengths}")
    return result


def describe(setup: Setup) -> str:
    answers = (
        f"answers end at EOS (p={setup.eos_probability:.3g}/token), at most {setup.response_length} tokens"
        if setup.stop_at_eos
        else f"{setup.response_length} tokens always"
    )
    return (
        f"PPO update, {setup.layers}x{setup.hidden_size} Llama, {setup.prompts} prompts, {answers}, micro-batch "
        f"{setup.micro}, {setup.ppo_epochs} epochs, {'bf16' if setup.device == 'cuda' else 'fp32'}, "
        f"{setup.device}, {setup.threads} thread(s); medians of quiet updates"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    trl_python = ensure_trl_venv()
    results = {}
    if args.config in ("fixed", "both"):
        fixed = Setup(reward="model", threads=args.threads, device=args.device)
        results["fixed"] = measure("fixed", fixed, args, trl_python, with_sweep=not args.no_sweep)
    if args.config in ("realistic", "both"):
        realistic = replace(REALISTIC, threads=args.threads, device=args.device)
        results["realistic"] = measure("realistic", realistic, args, trl_python, with_sweep=False)
    return results


if __name__ == "__main__":
    main()

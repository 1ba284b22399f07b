"""Why token A rather than B? Direct logit attribution per layer, head and neuron, and ablation.

    rlhf inspect logit-diff --model CKPT --prompt P --target A --distractor B
        [--ablate L2.H1 L3.N17 ...] [--ablation zero|mean --reference PROMPTS] [--rank total|direct]
        [--raw] [--out DIR]

At the prompt's last position the logit difference logit(A) - logit(B) is split exactly into what each part of
the residual stream contributes: the embedding, every attention head (its slice of the output projection times
its output), every MLP neuron (its activation times its column of the down projection) and the biases. Each
write goes through the final norm with its scale frozen at that position (the standard linearisation; the
parts then sum to the logit difference) and onto the unembedding difference U[A] - U[B].

Ablation replaces a unit's activation at every position by zero or by its mean over a reference set of prompts
and runs the model again: the change of the logit difference is its total effect, indirect paths included.
Direct attribution misses those paths, and in a small model most of an early unit's effect goes through them;
so units are also scored by a first-order estimate of their ablation effect (attribution patching, one
backward pass) and ranked by it by default (`--rank total`). Every run then measures the ablation of 5 units
found each way — by total effect, greedily (pick the largest estimate, ablate it, estimate again), and by direct
attribution — and, as a control, of the 5 with the smallest score.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf.cli import at_least
from rlhf.inspect import InspectError
from rlhf.inspect.html import heading, paragraph, table, write_json, write_page
from rlhf.inspect.model_parts import (
    ModelParts,
    capture_inputs,
    frozen_norm,
    locate,
    split_heads,
    unit_inputs,
    write_bias,
    write_weight,
)

CHECK_UNITS = 5
_UNIT_RE = re.compile(r"^L(\d+)\.([HN])(\d+)$")


@dataclass(frozen=True)
class Unit:
    """An attention head (`L2.H1`) or an MLP neuron (`L3.N17`)."""

    layer: int
    kind: str  # "head" or "neuron"
    index: int

    @property
    def name(self) -> str:
        return f"L{self.layer}.{'H' if self.kind == 'head' else 'N'}{self.index}"


def parse_unit(text: str, parts: ModelParts) -> Unit:
    match = _UNIT_RE.match(text)
    if not match:
        raise InspectError(f"--ablate {text!r}: expected L<layer>.H<head> or L<layer>.N<neuron>, e.g. L1.H0")
    # The sizes are only known once the model is located, so a unit out of range is refused after loading.
    layer, letter, index = int(match[1]), match[2], int(match[3])
    if layer >= len(parts.layers):
        raise InspectError(f"--ablate {text}: the model has {len(parts.layers)} layers")
    size = parts.layers[layer].n_heads if letter == "H" else parts.layers[layer].n_neurons
    if index >= size:
        raise InspectError(
            f"--ablate {text}: layer {layer} has {size} {'heads' if letter == 'H' else 'neurons'}"
        )
    return Unit(layer, "head" if letter == "H" else "neuron", index)


def single_token(tokenizer, text: str, flag: str) -> int:
    """The one token `text` stands for: its encoding, or an exact vocabulary entry such as 'ĠSure'."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    vocab_id = tokenizer.get_vocab().get(text)
    if vocab_id is not None:
        return vocab_id
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise InspectError(
        f"{flag} {text!r} is not one token of this vocabulary (it encodes to {len(ids)}: {pieces}); "
        "give a single token"
    )


def encode_prompt(tokenizer, prompt: str | list[dict], raw: bool) -> torch.Tensor:
    """[1, seq] ids of the prompt (a user message or a list of messages) as every stage renders it, or as given."""
    from rlhf.data import render_prompt

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = messages[-1]["content"] if raw else render_prompt(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=raw, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise InspectError("--prompt is empty")
    return ids


@torch.no_grad()
def logit_diff(model: nn.Module, ids: torch.Tensor, target: int, distractor: int) -> float:
    logits = model(ids).logits[0, -1]
    return float(logits[target] - logits[distractor])


@torch.no_grad()
def attribute(model: nn.Module, parts: ModelParts, ids: torch.Tensor, target: int, distractor: int) -> dict:
    """Every unit's direct contribution to logit(target) - logit(distractor) at the last position.

    Returns the logit difference, the per-unit contributions ({Unit: float}), per-layer totals and the
    remaining terms (embedding, biases), which together sum to the logit difference.
    """
    modules = {**unit_inputs(parts), "final_norm": parts.final_norm}
    with capture_inputs(modules) as acts:
        out = model(ids, output_hidden_states=True)
    logits = out.logits[0, -1]
    unembed = parts.unembedding.weight
    direction = (unembed[target] - unembed[distractor]).float()
    to_logit, norm_bias = frozen_norm(parts.final_norm, acts["final_norm"][0, -1])

    def score(writes: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n]
        return to_logit(writes) @ direction

    units: dict[Unit, float] = {}
    layers, other = [], {"embedding": float(score(out.hidden_states[0][0, -1:])[0])}
    for layer in parts.layers:
        i = layer.index
        heads = split_heads(acts[f"attn.{i}"][0, -1], layer.n_heads)  # [n_heads, head_dim]
        w_o = split_heads(write_weight(layer.attn_out), layer.n_heads)  # [hidden, n_heads, head_dim]
        head_scores = score(torch.einsum("dhk,hk->hd", w_o, heads))
        neurons = acts[f"mlp.{i}"][0, -1]  # [n_neurons]
        neuron_scores = score(write_weight(layer.mlp_out).T * neurons[:, None])
        units.update({Unit(i, "head", h): float(v) for h, v in enumerate(head_scores)})
        units.update({Unit(i, "neuron", n): float(v) for n, v in enumerate(neuron_scores)})
        for name, module in ((f"L{i}.attn_bias", layer.attn_out), (f"L{i}.mlp_bias", layer.mlp_out)):
            if write_bias(module) is not None:
                other[name] = float(score(write_bias(module)[None])[0])
        layers.append({"layer": i, "attention": float(head_scores.sum()), "mlp": float(neuron_scores.sum())})
    if norm_bias is not None:
        other["final_norm_bias"] = float(norm_bias.float() @ direction)
    if getattr(parts.unembedding, "bias", None) is not None:
        other["unembedding_bias"] = float(parts.unembedding.bias[target] - parts.unembedding.bias[distractor])
    total = sum(units.values()) + sum(other.values())
    return {
        "logit_diff": float(logits[target] - logits[distractor]),
        "sum_of_parts": total,
        "units": units,
        "layers": layers,
        "other": other,
    }


@torch.no_grad()
def unit_means(model: nn.Module, parts: ModelParts, prompts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each unit module's input averaged over every position of the reference prompts (for mean ablation)."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for ids in prompts:
        with capture_inputs(unit_inputs(parts)) as acts:
            model(ids)
        for key, value in acts.items():
            sums[key] = sums.get(key, 0) + value[0].sum(0)
        count += ids.shape[1]
    return {key: value / count for key, value in sums.items()}


@contextmanager
def ablated(
    parts: ModelParts, units: list[Unit], means: dict[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Within the block the units output zero (means=None) or their reference mean, at every position."""
    by_module: dict[str, list[Unit]] = {}
    for unit in units:
        by_module.setdefault(f"{'attn' if unit.kind == 'head' else 'mlp'}.{unit.layer}", []).append(unit)
    modules = unit_inputs(parts)
    handles = []
    for key, chosen in by_module.items():
        layer = parts.layers[chosen[0].layer]
        columns = torch.cat([_columns(u, layer.head_dim) for u in chosen])

        def hook(_module, args, key=key, columns=columns):
            x = args[0].clone()
            x[..., columns] = 0.0 if means is None else means[key][columns].to(x.dtype)
            return (x, *args[1:])

        handles.append(modules[key].register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _columns(unit: Unit, head_dim: int) -> torch.Tensor:
    if unit.kind == "neuron":
        return torch.tensor([unit.index])
    return torch.arange(unit.index * head_dim, (unit.index + 1) * head_dim)


def ablation_effect(model, parts, ids, units, means, target, distractor) -> float:
    with ablated(parts, units, means):
        return logit_diff(model, ids, target, distractor)


def total_effects(
    model: nn.Module,
    parts: ModelParts,
    ids: torch.Tensor,
    target: int,
    distractor: int,
    means: dict[str, torch.Tensor] | None = None,
) -> dict[Unit, float]:
    """How much ablating each unit at every position would lower the logit difference, to first order.

    Attribution patching: sum over positions of grad . (activation - ablated value), over the unit's columns,
    from one backward pass. Unlike direct attribution it counts the paths through later layers, which is where
    an early unit's effect mostly goes.
    """
    inputs: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(_module, args):
            x = args[0]
            if not x.requires_grad:
                # Frozen weights upstream: start the graph here. Never detach an input that is already in the
                # graph, or every later unit would cut the paths of the earlier ones through it.
                x = x.detach().requires_grad_(True)
            inputs[key] = x
            return (x, *args[1:])

        return hook

    modules = unit_inputs(parts)
    handles = [module.register_forward_pre_hook(keep(key)) for key, module in modules.items()]
    try:
        with torch.enable_grad():
            logits = model(ids).logits[0, -1]
            grads = torch.autograd.grad(logits[target] - logits[distractor], list(inputs.values()))
    finally:
        for handle in handles:
            handle.remove()
    effects: dict[Unit, float] = {}
    for (key, x), grad in zip(inputs.items(), grads, strict=True):
        layer = parts.layers[int(key.split(".")[1])]
        kind, count = ("head", layer.n_heads) if key.startswith("attn") else ("neuron", layer.n_neurons)
        ablated_value = 0.0 if means is None else means[key]
        per_unit = ((x[0].detach() - ablated_value) * grad[0]).sum(0).view(count, -1).sum(-1)
        effects.update({Unit(layer.index, kind, j): float(v) for j, v in enumerate(per_unit)})
    return effects


def greedy_units(model, parts, ids, target, distractor, means=None, k: int = CHECK_UNITS) -> list[Unit]:
    """k units that together carry the logit difference: take the unit of largest estimated ablation effect,
    ablate it, estimate again, repeat. Re-estimating counts what the chosen units already removed, so a unit
    whose work another one duplicates is not picked twice over (5 backward passes instead of one)."""
    sign = _sign(logit_diff(model, ids, target, distractor))
    chosen: list[Unit] = []
    for _ in range(k):
        with ablated(parts, chosen, means):
            effects = total_effects(model, parts, ids, target, distractor, means)
        chosen.append(max((u for u in effects if u not in chosen), key=lambda u: sign * effects[u]))
    return chosen


def top_units(scores: dict[Unit, float], sign: float, k: int = CHECK_UNITS) -> list[Unit]:
    return sorted(scores, key=lambda u: sign * scores[u], reverse=True)[:k]


def smallest_units(scores: dict[Unit, float], k: int = CHECK_UNITS) -> list[Unit]:
    return sorted(scores, key=lambda u: abs(scores[u]))[:k]


def _sign(value: float) -> float:
    # "Top" units push the logit difference the way it already goes (towards B when it is negative).
    return 1.0 if value >= 0 else -1.0


def ranking_check(model, parts, ids, top, control, result, means, target, distractor) -> dict:
    """Measured ablation of the top units and of the control units, each set at once."""
    return {
        name: _ablation_row(
            units, result, ablation_effect(model, parts, ids, units, means, target, distractor)
        )
        for name, units in (("top", top), ("smallest", control))
    }


def _ablation_row(units: list[Unit], result: dict, after: float) -> dict:
    before = result["logit_diff"]
    return {
        "units": [u.name for u in units],
        "direct": sum(result["units"][u] for u in units),
        "estimated": sum(result["total"][u] for u in units),
        "logit_diff_after": after,
        "change": after - before,
        "fraction_removed": (before - after) / before if before else None,
    }


# --------------------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Causal-LM checkpoint directory.")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="User message (rendered with the chat template).")
    prompts.add_argument("--prompts", help="Prompts file: every prompt in turn, with a summary over them.")
    parser.add_argument("--category", help="With --prompts: only the prompts of this category.")
    parser.add_argument("--target", required=True, help="Token A (must be exactly one token).")
    parser.add_argument("--distractor", required=True, help="Token B (must be exactly one token).")
    parser.add_argument("--raw", action="store_true", help="Feed --prompt as is, without the chat template.")
    parser.add_argument("--ablate", nargs="*", default=[], help="Units to ablate together: L2.H1 L3.N17 ...")
    parser.add_argument("--ablation", choices=["zero", "mean"], default="zero")
    parser.add_argument(
        "--reference", help="Prompts file whose activations give the means (--ablation mean)."
    )
    parser.add_argument(
        "--rank",
        choices=["total", "direct"],
        default="total",
        help="Order units by estimated ablation effect (total) or by direct logit attribution.",
    )
    parser.add_argument("--top", type=at_least(1), default=20, help="Units listed per sign in the output.")
    parser.add_argument("--out", default="outputs/inspect/logit-diff", help="Directory for JSON and HTML.")


def _load(args: argparse.Namespace):
    """Everything checkable before the model loads: prompts, reference data, tokens, then the model itself."""
    from rlhf.inspect import check_causal_lm
    from rlhf.models import disable_dropout, load_causal_lm, load_tokenizer

    if args.ablation == "mean" and not args.reference:
        raise InspectError("--ablation mean needs --reference PROMPTS (the prompts the means are taken over)")
    for text in args.ablate:
        if not _UNIT_RE.match(text):
            raise InspectError(
                f"--ablate {text!r}: expected L<layer>.H<head> or L<layer>.N<neuron>, e.g. L1.H0"
            )
    prompts = _prompts(args)
    references = _read_prompts(args.reference) if args.reference else []
    check_causal_lm(args.model)
    tokenizer = load_tokenizer(args.model)
    target = single_token(tokenizer, args.target, "--target")
    distractor = single_token(tokenizer, args.distractor, "--distractor")
    if target == distractor:
        raise InspectError(f"--target and --distractor are the same token ({args.target!r})")
    model = load_causal_lm(args.model, tokenizer).eval()
    disable_dropout(model)
    encoded = [encode_prompt(tokenizer, p, args.raw) for p in prompts]
    return (
        model,
        tokenizer,
        target,
        distractor,
        encoded,
        [encode_prompt(tokenizer, p, args.raw) for p in references],
    )


def _prompts(args: argparse.Namespace) -> list[str | list[dict]]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InspectError("--prompt is empty")
        return [args.prompt]
    prompts = _read_prompts(args.prompts, args.category)
    if not prompts:
        raise InspectError(f"{args.prompts}: no prompt has category {args.category!r}")
    return prompts


def _read_prompts(path: str, category: str | None = None) -> list[list[dict]]:
    from rlhf.data import load_prompts

    rows, _ = load_prompts(path, categories=None)  # a category is a label to filter by here
    return [row["prompt"] for row in rows if category is None or row.get("category") == category]


def run(args: argparse.Namespace) -> int:
    model, tokenizer, target, distractor, prompts, references = _load(args)
    parts = locate(model)
    chosen = [parse_unit(text, parts) for text in args.ablate]
    means = unit_means(model, parts, references) if args.ablation == "mean" else None
    reports = []
    for ids in prompts:
        result = attribute(model, parts, ids, target, distractor)
        result["total"] = total_effects(model, parts, ids, target, distractor, means)
        report = _report(args, tokenizer, ids, target, distractor, result)
        sign = _sign(result["logit_diff"])
        sets = {
            "total": (
                greedy_units(model, parts, ids, target, distractor, means),
                smallest_units(result["total"]),
            ),
            "direct": (top_units(result["units"], sign), smallest_units(result["units"])),
        }
        report["check"] = {
            ranking: ranking_check(model, parts, ids, top, control, result, means, target, distractor)
            for ranking, (top, control) in sets.items()
        }
        if chosen:
            after = ablation_effect(model, parts, ids, chosen, means, target, distractor)
            report["ablation"] = _ablation_row(chosen, result, after)
        reports.append(report)
    summary = summarise_checks(reports)
    _write(args.out, reports, summary)
    _print_summary(reports, summary)
    return 0


def summarise_checks(reports: list[dict]) -> dict:
    """Over prompts: how often ablating the top 5 removes at least half the logit difference, and the control less."""
    summary: dict = {"prompts": len(reports)}
    for ranking in ("total", "direct"):
        top = [r["check"][ranking]["top"]["fraction_removed"] or 0.0 for r in reports]
        control = [r["check"][ranking]["smallest"]["fraction_removed"] or 0.0 for r in reports]
        summary[ranking] = {
            "top_removes_half": sum(f >= 0.5 for f in top),
            "control_removes_half": sum(abs(f) >= 0.5 for f in control),
            "median_top_removed": statistics.median(top),
            "max_abs_control_removed": max(abs(f) for f in control),
        }
    return summary


def _report(args, tokenizer, ids, target, distractor, result) -> dict:
    scores = result["total"] if args.rank == "total" else result["units"]
    ranked = sorted(scores, key=scores.get, reverse=True)
    return {
        "model": args.model,
        "prompt": tokenizer.decode(ids[0], skip_special_tokens=True).strip(),
        "tokens": tokenizer.convert_ids_to_tokens(ids[0].tolist()),
        "target": {"text": args.target, "id": target, "token": tokenizer.convert_ids_to_tokens(target)},
        "distractor": {
            "text": args.distractor,
            "id": distractor,
            "token": tokenizer.convert_ids_to_tokens(distractor),
        },
        "ablation_mode": args.ablation,
        "reference": args.reference,
        "rank": args.rank,
        "logit_diff": result["logit_diff"],
        "sum_of_parts": result["sum_of_parts"],
        "layers": result["layers"],
        "other": result["other"],
        "top_units": [_unit_row(u, result) for u in ranked[: args.top]],
        "bottom_units": [_unit_row(u, result) for u in ranked[::-1][: args.top]],
    }


def _unit_row(unit: Unit, result: dict) -> dict:
    return {"unit": unit.name, "direct": result["units"][unit], "total": result["total"][unit]}


def _write(out: str, reports: list[dict], summary: dict) -> None:
    single = len(reports) == 1
    write_json(
        Path(out) / "logit_diff.json", reports[0] if single else {"summary": summary, "prompts": reports}
    )
    a, b = reports[0]["target"]["token"], reports[0]["distractor"]["token"]
    sections = [] if single else [_summary_table(summary)]
    for report in reports:
        if not single:
            sections.append(heading(f"{report['prompt']}: {report['logit_diff']:.3f}", level=2))
        sections += _sections(report)
    write_page(Path(out) / "logit_diff.html", f"logit({a}) - logit({b})", sections)


def _summary_table(summary: dict) -> str:
    rows = [(ranking, *summary[ranking].values()) for ranking in ("total", "direct")]
    columns = [
        "ranking",
        "top 5 remove >= half",
        "control removes >= half",
        "median removed",
        "max |control|",
    ]
    return table(columns, rows, caption=f"Ablation check over {summary['prompts']} prompts")


def _print_summary(reports: list[dict], summary: dict) -> None:
    for report in reports:
        a, b = report["target"]["token"], report["distractor"]["token"]
        removed = {k: report["check"][k]["top"]["fraction_removed"] or 0.0 for k in ("total", "direct")}
        print(
            f"logit({a}) - logit({b}) = {report['logit_diff']:.3f} (parts sum to {report['sum_of_parts']:.3f}); "
            f"top {CHECK_UNITS} {' '.join(report['check']['total']['top']['units'])} remove "
            f"{100 * removed['total']:.0f}% (by direct attribution: {100 * removed['direct']:.0f}%)"
        )
        if "ablation" in report:
            row = report["ablation"]
            print(
                f"  ablate {' '.join(row['units'])}: -> {row['logit_diff_after']:.3f} ({row['change']:+.3f})"
            )
    for ranking in ("total", "direct"):
        s = summary[ranking]
        print(
            f"{ranking} ranking over {summary['prompts']} prompts: top {CHECK_UNITS} remove >= half in "
            f"{s['top_removes_half']}, the control in {s['control_removes_half']} (max |control| "
            f"{s['max_abs_control_removed']:.3f})"
        )


def _sections(report: dict) -> list[str]:
    """The prompt, the per-layer split, the units each way, the ablations."""
    ablations = [
        (f"{name} {CHECK_UNITS} by {ranking}", *_ablation_cells(row))
        for ranking, check in report["check"].items()
        for name, row in check.items()
    ]
    if "ablation" in report:
        ablations.append(("requested", *_ablation_cells(report["ablation"])))
    other = ", ".join(f"{name} {value:.3f}" for name, value in report["other"].items())
    unit_columns = ["unit", "direct attribution", "estimated ablation effect"]
    return [
        paragraph(f"{report['model']}: {report['prompt']}"),
        paragraph(
            f"Direct attributions sum to {report['sum_of_parts']:.4f} with the terms not in the tables: "
            f"{other}. The estimated ablation effect ({report['ablation_mode']} ablation, first order) counts "
            f"indirect paths too; units are ranked by {report['rank']} effect.",
            note=True,
        ),
        heading("Direct attribution per layer"),
        table(
            ["layer", "attention", "MLP"], [(r["layer"], r["attention"], r["mlp"]) for r in report["layers"]]
        ),
        heading("Units pushing towards the target"),
        table(unit_columns, [(r["unit"], r["direct"], r["total"]) for r in report["top_units"]]),
        heading("Units pushing towards the distractor"),
        table(unit_columns, [(r["unit"], r["direct"], r["total"]) for r in report["bottom_units"]]),
        heading(f"Ablations ({report['ablation_mode']}, all positions, measured)"),
        table(["set", "units", "direct", "estimated", "logit diff after", "fraction removed"], ablations),
    ]


def _ablation_cells(row: dict) -> tuple:
    removed = row["fraction_removed"]
    return (
        " ".join(row["units"]),
        row["direct"],
        row["estimated"],
        row["logit_diff_after"],
        "" if removed is None else removed,
    )

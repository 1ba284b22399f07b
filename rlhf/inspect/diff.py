"""What PPO changed: neurons and attention heads ranked by the change of their activation and of their direct effect.

    rlhf inspect diff --before SFT_CKPT --after PPO_CKPT --prompts FILE [--data FILE...] [--out DIR]

Both models read the same token sequences: each prompt (rendered with the chat template) followed by the after
model's sampled answer (fixed seed). Per unit and per prompt category (the prompts file's `category`:
allowed / sensitive / disallowed, plus `all`):

- activation change: the mean over tokens of the norm of the change of what the unit writes into the residual
  stream, |a' w' - a w| for a neuron (activation a, down-projection column w), |W_O' z' - W_O z| for a head. It
  is in residual-stream units, so neurons, heads and layers compare directly;
- direct effect: the unit's write pushed through the final norm (its scale frozen at that position) onto the
  unembedding of the next answer token, centred on the mean unembedding, averaged over the answer's tokens: how
  much the unit itself raises the answer's tokens. Its change is after minus before, each model with its own
  weights.

Each ranked unit is explained and scored (offline token explainer, see `explain`) in both models, on the same
texts plus any `--data`. Output: `diff.json` and `diff.html`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.cli import at_least
from rlhf.inspect import InspectError
from rlhf.inspect.model_parts import (
    ModelParts,
    capture_inputs,
    frozen_norm,
    locate,
    split_heads,
    unit_inputs,
    write_weight,
)
from rlhf.inspect.neurons import unit_name

ALL = "all"


@dataclass
class Sequences:
    """Token ids of prompt + answer, where each answer starts, and each prompt's category."""

    ids: list[list[int]]
    answer_start: list[int]
    categories: list[str]
    prompts: list[str] = field(default_factory=list)


def answer_sequences(model, tokenizer, rows: list[dict], max_new_tokens: int, seed: int) -> Sequences:
    """The after model's answers, sampled as evaluation samples them (fixed seed, its default temperature 0.7)."""
    from rlhf.data import render_prompt
    from rlhf.evaluation import EvalSettings, answer

    prompt_ids = [
        tokenizer(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"] for r in rows
    ]
    answers = answer(model, tokenizer, prompt_ids, EvalSettings(max_new_tokens=max_new_tokens, seed=seed))
    responses = []
    for batch in answers.batches:
        for response, mask in zip(batch.response_ids, batch.response_mask, strict=True):
            responses.append(response[mask.bool()].tolist())
    return Sequences(
        ids=[p + r for p, r in zip(prompt_ids, responses, strict=True)],
        answer_start=[len(p) for p in prompt_ids],
        categories=[r.get("category") or ALL for r in rows],
        prompts=[r["prompt"][-1]["content"] for r in rows],
    )


# --------------------------------------------------------------------------------------------------------------
# One model on one sequence: unit writes and direct effects


@torch.no_grad()
def readout(parts: ModelParts, residual: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """[n, hidden] vectors u_t with effect(c) = c . u_t: the write c's direct effect on the centred logit of next_ids[t].

    The final norm is linear once its scale is frozen at position t (`frozen_norm`); applying it to the identity
    gives its matrix, and the matrix times the centred unembedding row is u_t.
    """
    unembed = parts.unembedding.weight.float()
    centred = unembed[next_ids] - unembed.mean(0)  # [n, hidden]
    eye = torch.eye(residual.shape[-1])
    rows = []
    for t in range(residual.shape[0]):
        to_logit, _ = frozen_norm(parts.final_norm, residual[t])
        rows.append(to_logit(eye) @ centred[t])
    return torch.stack(rows)


@dataclass
class Trace:
    """One model on one sequence. neurons[l]: [T, I] activations; heads[l]: [T, H, hidden] writes; readout [n, hidden]."""

    neurons: list[torch.Tensor]
    heads: list[torch.Tensor]
    readout: torch.Tensor


@torch.no_grad()
def trace(model, parts: ModelParts, ids: list[int], answer_start: int) -> Trace:
    modules = {**unit_inputs(parts), "final_norm": parts.final_norm}
    with capture_inputs(modules) as acts:
        model(torch.tensor([ids]))
    # Positions answer_start-1 .. T-2 predict the answer's tokens.
    span = slice(answer_start - 1, len(ids) - 1)
    next_ids = torch.tensor(ids[answer_start:])
    neurons, heads = [], []
    for layer in parts.layers:
        neurons.append(acts[f"mlp.{layer.index}"][0].float())
        z = split_heads(acts[f"attn.{layer.index}"][0].float(), layer.n_heads)  # [T, H, d]
        w_o = split_heads(write_weight(layer.attn_out).float(), layer.n_heads)  # [hidden, H, d]
        heads.append(torch.einsum("thd,khd->thk", z, w_o))
    return Trace(neurons, heads, readout(parts, acts["final_norm"][0, span].float(), next_ids))


@dataclass
class Totals:
    """Sums over tokens, per unit family (`mlp.L`, `attn.L`), for one category."""

    prompts: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def add(self, family: str, name: str, value: torch.Tensor) -> None:
        slot = self.sums.setdefault(family, {})
        slot[name] = slot.get(name, 0) + value


@torch.no_grad()
def compare(
    parts: tuple[ModelParts, ModelParts], traces: tuple[Trace, Trace], totals: Totals, start: int
) -> None:
    """Add one sequence's per-unit write changes and direct effects (before, after) to `totals`."""
    answer = slice(start - 1, start - 1 + traces[0].readout.shape[0])
    for i, (before, after) in enumerate(zip(*(p.layers for p in parts), strict=True)):
        w_b, w_a = write_weight(before.mlp_out).float(), write_weight(after.mlp_out).float()  # [hidden, I]
        a_b, a_a = traces[0].neurons[i], traces[1].neurons[i]  # [T, I]
        # |a' w' - a w|^2 = |(a' - a) w' + a (w' - w)|^2, expanded so no [T, I, hidden] tensor is built and
        # identical models give exactly 0.
        delta_a, delta_w = a_a - a_b, w_a - w_b
        square = (
            (delta_a * w_a.norm(dim=0)) ** 2
            + (a_b * delta_w.norm(dim=0)) ** 2
            + 2 * delta_a * a_b * (w_a * delta_w).sum(0)
        )
        totals.add(f"mlp.{i}", "change", square.clamp(min=0).sqrt().sum(0))
        totals.add(f"mlp.{i}", "activation_delta", (a_a - a_b).sum(0))
        totals.add(f"mlp.{i}", "effect_before", (a_b[answer] * (traces[0].readout @ w_b)).sum(0))
        totals.add(f"mlp.{i}", "effect_after", (a_a[answer] * (traces[1].readout @ w_a)).sum(0))
        h_b, h_a = traces[0].heads[i], traces[1].heads[i]  # [T, H, hidden]
        totals.add(f"attn.{i}", "change", (h_a - h_b).norm(dim=-1).sum(0))
        totals.add(f"attn.{i}", "activation_delta", (h_a.norm(dim=-1) - h_b.norm(dim=-1)).sum(0))
        totals.add(f"attn.{i}", "effect_before", torch.einsum("thk,tk->h", h_b[answer], traces[0].readout))
        totals.add(f"attn.{i}", "effect_after", torch.einsum("thk,tk->h", h_a[answer], traces[1].readout))


def accumulate(models: tuple, sequences: Sequences) -> dict[str, Totals]:
    """Per category (and `all`): per-unit sums over every token of every sequence."""
    from rlhf.inspect.neurons import progress

    parts = tuple(locate(m) for m in models)
    totals: dict[str, Totals] = {}
    with progress(len(sequences.ids), "comparing", "prompt") as bar:
        for ids, start, category in zip(
            sequences.ids, sequences.answer_start, sequences.categories, strict=True
        ):
            if len(ids) <= start:
                bar.update(1)
                continue  # an empty answer has no token to predict
            traces = tuple(trace(m, p, ids, start) for m, p in zip(models, parts, strict=True))
            for name in {category, ALL}:
                slot = totals.setdefault(name, Totals())
                slot.prompts += 1
                slot.tokens += len(ids)
                slot.answer_tokens += len(ids) - start
                compare(parts, traces, slot, start)
            bar.update(1)
    return totals


# --------------------------------------------------------------------------------------------------------------
# Ranking, explanations, output


def unit_rows(totals: Totals) -> list[dict[str, Any]]:
    """Every unit's per-token means for one category."""
    rows = []
    for family, sums in totals.sums.items():
        per_token = {k: v / max(totals.tokens, 1) for k, v in sums.items() if not k.startswith("effect")}
        per_answer = {k: v / max(totals.answer_tokens, 1) for k, v in sums.items() if k.startswith("effect")}
        for u in range(len(sums["change"])):
            before, after = float(per_answer["effect_before"][u]), float(per_answer["effect_after"][u])
            rows.append(
                {
                    "unit": unit_name(family, u),
                    "activation_change": float(per_token["change"][u]),
                    "activation_delta": float(per_token["activation_delta"][u]),
                    "effect_before": before,
                    "effect_after": after,
                    "effect_change": after - before,
                }
            )
    return rows


# Neurons and heads are ranked apart: a head writes a whole subspace, a neuron one direction, so heads would
# crowd the neurons out of one list.
RANKINGS = ("neurons_by_effect", "neurons_by_activation", "heads_by_effect", "heads_by_activation")


def rank(totals: dict[str, Totals], top: int) -> dict[str, dict[str, Any]]:
    """Per category: the `top` neurons and heads by the size of their direct-effect change and by activation change."""
    ranked = {}
    for category, slot in sorted(totals.items(), key=lambda kv: (kv[0] == ALL, kv[0])):
        rows = unit_rows(slot)
        ranked[category] = {
            "prompts": slot.prompts,
            "tokens": slot.tokens,
            "answer_tokens": slot.answer_tokens,
        }
        for kind, letter in (("neurons", ".N"), ("heads", ".H")):
            mine = [r for r in rows if letter in r["unit"]]
            by_effect = sorted(mine, key=lambda r: -abs(r["effect_change"]))
            by_activation = sorted(mine, key=lambda r: -r["activation_change"])
            ranked[category][f"{kind}_by_effect"] = by_effect[:top]
            ranked[category][f"{kind}_by_activation"] = by_activation[:top]
    return ranked


def explain_ranked(
    models, tokenizer, sequences: Sequences, data_excerpts: list[list[int]], units: list[str], args
):
    """{"before"|"after": {unit: explanation result}} on the diff's own sequences plus any --data excerpts."""
    from rlhf.inspect.explain import explain_units, token_explainer, token_simulator
    from rlhf.inspect.neurons import record

    excerpts = [ids[: args.excerpt_tokens] for ids in sequences.ids] + data_excerpts
    out = {}
    for side, model in zip(("before", "after"), models, strict=True):
        recording = record(model, tokenizer, excerpts, args.top_k, args.random, heads=True, seed=args.seed)
        results = explain_units(recording, units, token_explainer, token_simulator)
        out[side] = {r["unit"]: {**r, "recording": recording} for r in results}
    return out


def check_same_shape(models, paths: tuple[str, str], tokenizers) -> None:
    shapes = [[(p.n_neurons, p.n_heads) for p in locate(m).layers] for m in models]
    if shapes[0] != shapes[1]:
        raise InspectError(
            f"{paths[0]} and {paths[1]}: different architectures (layers of {shapes[0]} vs {shapes[1]})"
        )
    if tokenizers[0].get_vocab() != tokenizers[1].get_vocab():
        raise InspectError(f"{paths[0]} and {paths[1]}: different tokenizers; a diff needs the same tokens")


def first_per_category(rows: list[dict], n: int) -> list[dict]:
    seen: dict[str | None, int] = {}
    kept = []
    for row in rows:
        seen[row.get("category")] = seen.get(row.get("category"), 0) + 1
        if seen[row.get("category")] <= n:
            kept.append(row)
    return kept


def load_inputs(args: argparse.Namespace):
    """Prompts and --data first (errors before any model loads), then both checkpoints."""
    from rlhf.data import load_prompts
    from rlhf.inspect import check_causal_lm, load_model
    from rlhf.inspect.neurons import read_documents

    rows, _ = load_prompts(args.prompts, categories=None)  # a category is a label to group by here
    if not rows:
        raise InspectError(f"{args.prompts}: empty prompts file (no rows)")
    rows = first_per_category(rows, args.per_category) if args.per_category else rows
    documents = read_documents(args.data) if args.data else []
    for path in (args.before, args.after):
        check_causal_lm(path)
    (before, tok_b), (after, tok_a) = load_model(args.before), load_model(args.after)
    check_same_shape((before, after), (args.before, args.after), (tok_b, tok_a))
    return rows, documents, (before, after), tok_a


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--before", required=True, help="The model before RLHF (e.g. the SFT checkpoint).")
    parser.add_argument("--after", required=True, help="The model after RLHF (e.g. the PPO checkpoint).")
    parser.add_argument("--prompts", required=True, help="Prompts file (the data module's prompts schema).")
    parser.add_argument("--data", nargs="*", help="More texts to explain the units on (as for `neurons`).")
    parser.add_argument("--out", default="outputs/inspect/diff", help="Output directory.")
    parser.add_argument("--top", type=at_least(1), default=10, help="Units listed per category and ranking.")
    parser.add_argument(
        "--per-category",
        type=at_least(0),
        default=0,
        help="Use only the first N prompts of each category (0 = all).",
    )
    parser.add_argument("--max-new-tokens", type=at_least(1), default=32, help="Answer length.")
    parser.add_argument("--excerpt-tokens", type=at_least(1), default=64)
    parser.add_argument(
        "--top-k", type=at_least(1), default=20, help="Top excerpts per unit for the explanations."
    )
    parser.add_argument(
        "--random", type=at_least(0), default=20, help="Random excerpts for the explanations."
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from rlhf.inspect import html
    from rlhf.inspect.neurons import make_excerpts, render

    rows, documents, models, tokenizer = load_inputs(args)
    sequences = answer_sequences(models[1], tokenizer, rows, args.max_new_tokens, args.seed)
    ranked = rank(accumulate(models, sequences), args.top)
    units = sorted({r["unit"] for c in ranked.values() for key in RANKINGS for r in c[key]})
    data_excerpts = make_excerpts(tokenizer, [render(tokenizer, d) for d in documents], args.excerpt_tokens)
    explained = explain_ranked(models, tokenizer, sequences, data_excerpts, units, args)
    for category in ranked.values():
        for key in RANKINGS:
            for row in category[key]:
                for side in ("before", "after"):
                    row[f"explanation_{side}"] = explained[side][row["unit"]]["explanation"]
                    row[f"score_{side}"] = explained[side][row["unit"]]["score"]
    result = {"before": args.before, "after": args.after, "prompts": args.prompts, "categories": ranked}
    out = Path(args.out)
    html.write_json(out / "diff.json", result)
    title = f"What RLHF changed: {args.before} -> {args.after}"
    html.write_page(out / "diff.html", title, page(result, explained, models, tokenizer, sequences))
    best = ranked.get("disallowed", ranked[ALL])["neurons_by_effect"][0]
    print(
        f"ranked {len(units)} units over {len(rows)} prompts; largest direct-effect change "
        f"{'(disallowed) ' if 'disallowed' in ranked else ''}{best['unit']} {best['effect_change']:+.3f} "
        f"({best['explanation_after']}, score {best['score_after']:.2f}) -> {out}"
    )
    return 0


# --------------------------------------------------------------------------------------------------------------
# Page


def _table(rows: list[dict[str, Any]], caption: str):
    from rlhf.inspect import html

    def said(row: dict, side: str) -> str:
        return f"{row[f'explanation_{side}']} ({row[f'score_{side}']:.2f})"

    return html.table(
        [
            "unit",
            "direct effect before → after",
            "change",
            "activation change",
            "explanation after (score)",
            "explanation before (score)",
        ],
        [
            [
                html.link(f"#{r['unit']}", r["unit"]),
                f"{r['effect_before']:+.3f} → {r['effect_after']:+.3f}",
                r["effect_change"],
                r["activation_change"],
                said(r, "after"),
                said(r, "before"),
            ]
            for r in rows
        ],
        caption,
    )


def _example(unit: str, models, tokenizer, ids: list[int]) -> list[str]:
    """One sequence shaded by the unit's activation before and after, on one scale."""
    from rlhf.inspect import html
    from rlhf.inspect.neurons import forward_units, unit_key

    family, index = unit_key(unit)
    acts = [
        forward_units(m, locate(m), [ids], tokenizer.pad_token_id, heads=True)[family][0, :, index]
        for m in models
    ]
    scale = float(max(a.abs().max() for a in acts))
    tokens = [tokenizer.decode([i]) for i in ids]
    return [
        html.paragraph(f"{side}:", note=True) + html.tokens_html(tokens, a.tolist(), scale)
        for side, a in zip(("before", "after"), acts, strict=True)
    ]


def page(result: dict, explained: dict, models, tokenizer, sequences: Sequences) -> list[str]:
    from rlhf.inspect import html
    from rlhf.inspect.neurons import unit_card

    sections = [
        html.paragraph(
            "Activation change: mean over tokens of the norm of the change of what the unit writes into the residual "
            "stream. Direct effect: the unit's write through the frozen final norm onto the centred unembedding of the "
            "next answer token, averaged over answer tokens (logits). Explanations: offline token explainer, scored by "
            "the correlation of simulated and true activations on held-out excerpts.",
            note=True,
        )
    ]
    for category, ranked in result["categories"].items():
        sections.append(
            html.heading(f"{category}: {ranked['prompts']} prompts, {ranked['answer_tokens']} answer tokens")
        )
        for key in RANKINGS:
            kind, _, measure = key.split("_", 2)
            what = "the change of their direct effect" if measure == "effect" else "activation change"
            sections.append(_table(ranked[key], f"{kind} ranked by {what}"))
        if category != ALL:
            first = sequences.categories.index(category)
            unit = ranked["neurons_by_effect"][0]["unit"]
            sections.append(html.heading(f"{unit} on the first {category} prompt, before and after", level=3))
            sections += _example(unit, models, tokenizer, sequences.ids[first])
    sections.append(html.heading("Units: top-activating excerpts after RLHF"))
    sections += [
        unit_card(r["recording"], u, r["explanation"], r["score"])
        for u, r in sorted(explained["after"].items())
    ]
    return sections


def report_summary(before: str, after: str, prompts: str, out: Path, per_category: int) -> dict[str, Any]:
    """`diff` on the first `per_category` prompts of each category, for a pipeline report to link.

    Returns the page's path relative to `out`'s parent and, per category, the neuron and the head whose direct
    effect on the answers changed most, with their explanations and scores.
    """
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--before", before, "--after", after, "--prompts", prompts, "--out", str(out)]
    run(parser.parse_args([*argv, "--per-category", str(per_category), "--top", "5"]))
    result = json.loads((Path(out) / "diff.json").read_text())
    return {
        "page": f"{Path(out).name}/diff.html",
        "per_category": per_category,
        "top": {
            category: {"neuron": ranked["neurons_by_effect"][0], "head": ranked["heads_by_effect"][0]}
            for category, ranked in result["categories"].items()
        },
    }

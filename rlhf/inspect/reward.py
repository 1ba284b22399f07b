"""Which tokens earn a reward-model score? Integrated gradients over the embeddings, checked by leave-one-out.

    rlhf inspect reward --model REWARD_CKPT --data FILE [--category C] [--mark REGEX] [--baseline mean|pad]
        [--steps 64] [--out DIR]

FILE holds `prompt` + `response` (or `responses`) rows, as for `rlhf reward score`. Each answer is rendered
the way the reward model reads it (`rlhf.rewards.reward_text`) and scored at its last token. Integrated
gradients (Sundararajan et al., 2017) walk the embeddings from a baseline (the same conversation with every
token but the special ones replaced by the vocabulary's mean embedding, or with `--baseline pad` the pad
token's) to the input; a token's attribution is (x - x') . (mean gradient along the path), summed over the
embedding dimension. They add up to score(x) - score(baseline) up to the quadrature error, reported as the
completeness gap. Leave-one-out puts the baseline embedding at one position at a time and reports the score
drop; the two should agree in sign and order. Scores are raw (before the manifest's normalisation).

`--mark REGEX` names a span of the answers (e.g. a refusal) and reports the share of the positive attribution
its tokens carry.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import nn

from rlhf.cli import at_least
from rlhf.inspect import InspectError, model_config
from rlhf.inspect.html import heading, paragraph, table, tokens_html, write_json, write_page

GROUPS = ("marked", "rest of answer", "prompt and template")
"""Where a token sits: in the --mark span of the answer, elsewhere in the answer, or in the prompt/template."""


def _score(model: nn.Module, embeds: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [batch] of unpadded sequences [batch, seq, hidden], read as the model reads them. A model that pools
    over the last turn finds it in the token ids `ids` [seq] (the embeddings may be blanked)."""
    pools_a_turn = getattr(model.config, "pool_last_turn", False) if hasattr(model, "config") else False
    extra = {"turn_ids": ids.expand(len(embeds), -1)} if pools_a_turn and ids is not None else {}
    return model(inputs_embeds=embeds, **extra).logits[:, 0].float()


def integrated_gradients(
    model: nn.Module,
    embeds: torch.Tensor,
    baseline: torch.Tensor,
    steps: int = 64,
    batch: int = 16,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token attributions [seq] of the score: midpoint rule over `steps` points of the straight path."""
    # The path in the model's dtype (a bf16 model takes bf16 inputs), the gradients summed in float32.
    alphas = ((torch.arange(steps, dtype=torch.float32) + 0.5) / steps).to(embeds.dtype)
    grad_sum = torch.zeros_like(embeds, dtype=torch.float32)
    for start in range(0, steps, batch):
        alpha = alphas[start : start + batch].view(-1, 1, 1)
        path = (baseline + alpha * (embeds - baseline)).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_score(model, path, ids).sum(), path)
        grad_sum += grad.float().sum(0)
    return ((embeds - baseline).float() * grad_sum / steps).sum(-1)


@torch.no_grad()
def leave_one_out(
    model: nn.Module,
    embeds: torch.Tensor,
    baseline: torch.Tensor,
    batch: int = 16,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """score(x) - score(x with position i set to the baseline), for every position i: [seq]."""
    full = _score(model, embeds[None], ids)[0]
    seq = embeds.shape[0]
    drops = []
    for start in range(0, seq, batch):
        positions = torch.arange(start, min(start + batch, seq))
        edited = embeds.repeat(len(positions), 1, 1)
        edited[torch.arange(len(positions)), positions] = baseline[positions]
        drops.append(full - _score(model, edited, ids))
    return torch.cat(drops)


def baseline_embedding(model: nn.Module, kind: str, pad_id: int) -> torch.Tensor:
    """The embedding [hidden] every baseline position holds: the vocabulary's mean, or the pad token's.

    The mean is the default: Llama-style models keep the pad row at zero, and an RMS norm makes the score
    constant along alpha * x, so a zero baseline puts the whole path integral in a spike at alpha -> 0
    (a huge completeness gap).
    """
    weight = model.get_input_embeddings().weight.detach()
    return weight.mean(0) if kind == "mean" else weight[pad_id]


def attribute_answer(
    model: nn.Module,
    ids: list[int],
    baseline_vector: torch.Tensor,
    steps: int,
    keep: list[bool] | None = None,
) -> dict:
    """IG and leave-one-out attributions of one token sequence, with the completeness check.

    Positions in `keep` (the special tokens of the chat template) hold their own embedding in the baseline too:
    the baseline is the same conversation with its words blanked, and those positions get attribution 0. The
    score is read at the final end-of-turn token, so blanking it would hand that one token most of the score.
    """
    id_tensor = torch.tensor(ids)
    embeds = model.get_input_embeddings()(id_tensor).detach()
    kept = torch.tensor(keep if keep is not None else [False] * len(ids))
    baseline = torch.where(kept[:, None], embeds, baseline_vector.expand_as(embeds))
    ig = integrated_gradients(model, embeds, baseline, steps, ids=id_tensor)
    loo = leave_one_out(model, embeds, baseline, ids=id_tensor)
    with torch.no_grad():
        score, base_score = _score(model, torch.stack([embeds, baseline]), id_tensor).tolist()
    return {
        "score": score,
        "baseline_score": base_score,
        "ig": ig.tolist(),
        "loo": loo.tolist(),
        "completeness_gap": float(ig.sum()) - (score - base_score),
        "ig_loo_correlation": _correlation(ig[~kept], loo[~kept]),
    }


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else None


def marked_tokens(
    offsets: list[tuple[int, int]], text: str, answer_start: int, pattern: re.Pattern
) -> list[bool]:
    """Whether each token overlaps a match of `pattern` inside the answer (which starts at `answer_start`)."""
    spans = [
        (m.start() + answer_start, m.end() + answer_start) for m in pattern.finditer(text[answer_start:])
    ]
    return [any(s < end and e > start for s, e in spans) for start, end in offsets]


def positive_share(values: list[float], chosen: list[bool]) -> float | None:
    total = sum(v for v in values if v > 0)
    return sum(v for v, c in zip(values, chosen, strict=True) if c and v > 0) / total if total > 0 else None


# --------------------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Reward-model checkpoint (sequence classification).")
    parser.add_argument("--data", required=True, help="prompt + response (or responses) rows.")
    parser.add_argument("--category", help="Only the rows of this prompt category (e.g. disallowed).")
    parser.add_argument("--mark", help="Regex over the answers: report the positive share its tokens carry.")
    parser.add_argument("--steps", type=at_least(1), default=64, help="Integrated-gradients steps.")
    parser.add_argument(
        "--baseline", choices=["mean", "pad"], default="mean", help="Embedding of the baseline."
    )
    parser.add_argument("--out", default="outputs/inspect/reward", help="Directory for JSON and HTML.")


def check_reward_model(path: str) -> None:
    """Refuse, before loading weights, a directory that is not a sequence-classification checkpoint."""
    architectures = model_config(path).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        found = ", ".join(architectures) or "no architectures"
        raise InspectError(
            f"{path}: not a reward model (config.json: {found}; expected *ForSequenceClassification)"
        )


def load_answers(path: str, category: str | None = None) -> list[tuple[list[dict], str, dict]]:
    """(prompt messages, answer, row) for every answer in the file (of one prompt category if given); a row
    without an answer is an error."""
    from rlhf.data import load_scored_answers

    rows, _ = load_scored_answers(path)  # each answer checked (PATH:LINE); an empty file is an error there
    if category is not None:
        rows = [row for row in rows if row.get("category") == category]
        if not rows:
            raise InspectError(f"{path}: no row has category {category!r}")
    return [(row["prompt"], answer, row) for row in rows for answer in row["responses"]]


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from rlhf.models import disable_dropout, load_scalar_model, load_tokenizer

    if args.steps < 1:
        raise InspectError(f"--steps must be at least 1, got {args.steps}")
    pattern = _compile(args.mark)
    check_reward_model(args.model)
    answers = load_answers(args.data, args.category)
    tokenizer = load_tokenizer(args.model)
    model = load_scalar_model(args.model, tokenizer).eval()
    disable_dropout(model)
    model.requires_grad_(False)
    # From embeddings the model cannot look for pad tokens; our sequences are unpadded, so it need not (its warning
    # is silenced for these calls only: the verbosity is global and changes e.g. TrainingArguments' defaults).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        baseline = baseline_embedding(model, args.baseline, tokenizer.pad_token_id)
        rows = [
            _explain(model, tokenizer, prompt, answer, row, pattern, baseline, args.steps)
            for prompt, answer, row in answers
        ]
    finally:
        hf_logging.set_verbosity(verbosity)
    report = {
        "model": args.model,
        "data": args.data,
        "baseline": args.baseline,
        "mark": args.mark,
        "summary": summarise(rows),
        "rows": rows,
    }
    write_json(Path(args.out) / "reward.json", report)
    write_page(Path(args.out) / "reward.html", "Reward attribution", _sections(report))
    _print_summary(report)
    return 0


def _compile(mark: str | None) -> re.Pattern | None:
    if mark is None:
        return None
    try:
        return re.compile(mark)
    except re.error as err:
        raise InspectError(f"--mark {mark!r}: not a regular expression ({err})") from None


def _explain(
    model, tokenizer, prompt: list[dict], answer: str, row: dict, pattern, baseline, steps: int
) -> dict:
    from rlhf.rewards import encode_for_scoring, reward_text

    text = reward_text(tokenizer, prompt, [{"role": "assistant", "content": answer}])
    ids = encode_for_scoring(tokenizer, text)
    offsets = _offsets(tokenizer, text, ids)
    start = text.rfind(answer.strip())
    special = set(tokenizer.all_special_ids)
    # The answer's own tokens: not the end-of-turn token the template closes it with (kept at the baseline, its
    # attribution is 0 and would only dilute the answer's mean per token).
    in_answer = [
        start >= 0 and s >= start and i not in special for (s, _), i in zip(offsets, ids, strict=True)
    ]
    in_prompt = [start < 0 or s < start for s, _ in offsets]
    marked = marked_tokens(offsets, text, start, pattern) if pattern and start >= 0 else [False] * len(ids)
    result = attribute_answer(model, ids, baseline, steps, keep=[i in special for i in ids])
    explained = {
        "prompt": prompt[-1]["content"],
        "response": answer,
        "category": row.get("category"),
        "tokens": tokenizer.convert_ids_to_tokens(ids),
        "in_answer": in_answer,
        "in_prompt": in_prompt,
        "marked": marked,
        **result,
    }
    groups = GROUPS if pattern is not None else GROUPS[1:]
    explained["positive_share"] = {g: positive_share(result["ig"], _group_mask(explained, g)) for g in groups}
    return explained


def _offsets(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token of `ids` (special tokens added by the tokenizer get an empty span)."""
    for add_special in (True, False):
        encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        if encoded["input_ids"] == ids:
            return [tuple(span) for span in encoded["offset_mapping"]]
    raise InspectError(f"{tokenizer.name_or_path}: cannot map tokens back to characters")


def summarise(rows: list[dict]) -> dict:
    """Across answers: the completeness gap relative to the score change, IG/leave-one-out agreement, and
    where the positive attribution sits (mean share per group, how often each group holds the largest one).
    """
    relative_gaps = [
        abs(r["completeness_gap"]) / abs(r["score"] - r["baseline_score"])
        for r in rows
        if r["score"] != r["baseline_score"]
    ]
    correlations = [r["ig_loo_correlation"] for r in rows if r["ig_loo_correlation"] is not None]
    groups = list(rows[0]["positive_share"])
    shares = {g: [r["positive_share"][g] for r in rows if r["positive_share"][g] is not None] for g in groups}
    largest = [max(groups, key=lambda g: r["positive_share"][g] or 0.0) for r in rows]
    summary = {
        "answers": len(rows),
        "max_relative_completeness_gap": max(relative_gaps, default=None),
        "mean_ig_loo_correlation": _mean(correlations),
        "mean_positive_share": {g: _mean(v) for g, v in shares.items()},
        "largest_share_count": {g: largest.count(g) for g in groups},
        # Shares grow with a group's length; the mean per token does not.
        "mean_attribution_per_token": {
            g: _mean([_per_token(r, g) for r in rows if _per_token(r, g) is not None]) for g in groups
        },
    }
    if "marked" in groups:
        # Answers with a marked span only: the share is 0 by construction where nothing matched.
        with_mark = [r for r in rows if any(r["marked"])]
        summary["answers_with_mark"] = len(with_mark)
        summary["mean_marked_share_where_present"] = _mean(
            [r["positive_share"]["marked"] or 0.0 for r in with_mark]
        )
        summary["marked_largest_where_present"] = sum(
            max(groups, key=lambda g: r["positive_share"][g] or 0.0) == "marked" for r in with_mark
        )
        # The answer's own most positive token (the prompt's may be larger: it is not what the answer said).
        tops = [
            max((i for i, a in enumerate(r["in_answer"]) if a), key=r["ig"].__getitem__, default=None)
            for r in rows
        ]
        summary["top_token_marked"] = sum(
            r["marked"][top] for r, top in zip(rows, tops, strict=True) if top is not None
        )
    return summary


def _per_token(row: dict, group: str) -> float | None:
    chosen = _group_mask(row, group)
    values = [v for v, c in zip(row["ig"], chosen, strict=True) if c]
    return sum(values) / len(values) if values else None


def _group_mask(row: dict, group: str) -> list[bool]:
    if group == "marked":
        return row["marked"]
    if group == "rest of answer":
        return [a and not m for a, m in zip(row["in_answer"], row["marked"], strict=True)]
    return row["in_prompt"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _sections(report: dict) -> list[str]:
    summary = report["summary"]
    sections = [
        paragraph(f"{report['model']} on {report['data']}: {summary['answers']} answers."),
        table(["measure", "value"], [(k, str(v)) for k, v in summary.items()], caption="Summary"),
        paragraph(
            "Tokens shaded by integrated-gradients attribution (orange raises the score, blue lowers it); "
            "the second line by leave-one-out.",
            note=True,
        ),
    ]
    for index, row in enumerate(report["rows"]):
        shares = ", ".join(f"{g} {v:.2f}" for g, v in row["positive_share"].items() if v is not None)
        sections += [
            heading(f"{index}. {row['prompt']}", level=3),
            paragraph(
                f"score {row['score']:.3f} (baseline {row['baseline_score']:.3f}); completeness gap "
                f"{row['completeness_gap']:.2g}; IG/leave-one-out correlation "
                f"{row['ig_loo_correlation'] or 0:.2f}; "
                f"positive share: {shares}",
                note=True,
            ),
            tokens_html(row["tokens"], row["ig"]),
            tokens_html(row["tokens"], row["loo"]),
        ]
    return sections


def _print_summary(report: dict) -> None:
    summary = report["summary"]
    print(
        f"{summary['answers']} answers; IG vs leave-one-out correlation "
        f"{summary['mean_ig_loo_correlation']:.3f}; "
        f"largest relative completeness gap {summary['max_relative_completeness_gap']:.2g}"
    )
    for group, share in summary["mean_positive_share"].items():
        print(
            f"  mean share of positive attribution on {group}: "
            f"{share if share is None else round(share, 3)}; "
            f"largest in {summary['largest_share_count'][group]} answers"
        )

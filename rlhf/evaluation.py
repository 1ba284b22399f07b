"""Evaluation of a policy against its reference: reward-model score, KL, gold judge, safety rates, win rates.

    rlhf eval --policy PATH [--reference PATH] [--reward PATH] --prompts FILE [--gold rlhf.demo:gold_judge]
              [--safety-config configs/safety/rules.yaml] [--out report.json]

Both models answer the same held-out prompts with the same sampling settings and seed; every metric is computed
on those answers, so policy and reference are compared like for like.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf.config import check_field_types
from rlhf.data import load_prompts, render_prompt
from rlhf.rollout import Rollout, check_sampling, cut_after_eos, generate, left_pad, policy_forward

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What `generate` and the KL pass need; PPO's config carries the same names."""

    max_new_tokens: int = 48
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    always_full_length: bool = False
    batch_size: int = 32
    seed: int = 0
    samples_shown: int = 12
    reward_allowed_modules: list[str] = field(default_factory=lambda: ["rlhf."])

    def __post_init__(self) -> None:
        check_field_types(self)
        check_sampling(self)


@dataclass
class Answers:
    completions: list[str]
    batches: list[Rollout]
    eos: list[bool]
    lengths: list[int]


@torch.no_grad()
def answer(model, tokenizer, prompt_ids: list[list[int]], settings: EvalSettings) -> Answers:
    """Sample one answer per prompt, in batches, from a fixed seed."""
    torch.manual_seed(settings.seed)
    model.eval()
    device = next(model.parameters()).device
    completions, batches, eos, lengths = [], [], [], []
    for start in tqdm(range(0, len(prompt_ids), settings.batch_size), desc="generating", leave=False):
        query_ids, query_mask = left_pad(
            prompt_ids[start : start + settings.batch_size], tokenizer.pad_token_id
        )
        query_ids, query_mask = query_ids.to(device), query_mask.to(device)
        raw = generate(model, query_ids, query_mask, tokenizer, settings)
        response_ids, response_mask, has_eos = cut_after_eos(
            raw, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        batches.append(Rollout(query_ids, query_mask, response_ids, response_mask, has_eos))
        completions += tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        eos += has_eos.tolist()
        lengths += response_mask.sum(1).tolist()
    return Answers(completions, batches, eos, lengths)


@torch.no_grad()
def sequence_kl(policy, reference, answers: Answers, temperature: float) -> list[float]:
    """KL(policy || reference) per answer: sum_t log pi(y_t) - log pi_ref(y_t) over the policy's own samples (k1)."""
    out: list[float] = []
    for batch in answers.batches:
        logp, _ = policy_forward(policy, batch, temperature)
        ref, _ = policy_forward(reference, batch, temperature)
        out += ((logp - ref) * batch.response_mask).sum(1).tolist()
    return out


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """Share of prompts where our answer scores higher; ties count half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True))
    return wins / max(1, len(ours))


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def by_category(rows: list[dict], scores: list[float]) -> dict[str, float]:
    """Mean score per prompt `category` (rows without one are left out): shows where a change came from."""
    groups: dict[str, list[float]] = {}
    for row, score in zip(rows, scores, strict=True):
        if row.get("category"):
            groups.setdefault(row["category"], []).append(score)
    return {category: mean(values) for category, values in sorted(groups.items())}


@dataclass
class Judges:
    """The scorers evaluation uses; each is optional."""

    reward: Any = None  # RewardModelScorer
    gold: Any = None  # callable (prompts, completions) -> scores
    safety: Any = None  # SafetyReward


def policy_metrics(
    rows: list[dict], answers: Answers, judges: Judges
) -> tuple[dict[str, Any], dict[str, list]]:
    """Aggregate metrics for one model's answers, and the per-prompt scores used for win rates."""
    prompts = [row["prompt"][-1]["content"] for row in rows]
    per_prompt: dict[str, list] = {}
    metrics: dict[str, Any] = {
        "response_length": mean(answers.lengths),
        "eos_rate": mean([float(e) for e in answers.eos]),
    }
    if judges.reward is not None:
        per_prompt["rm"] = judges.reward(
            prompts, answers.completions, prompt_messages=[r["prompt"] for r in rows], finished=answers.eos
        )
        metrics["rm_score"] = mean(per_prompt["rm"])
    if judges.gold is not None:
        per_prompt["gold"] = list(judges.gold(prompts, answers.completions))
        metrics["gold_score"] = mean(per_prompt["gold"])
        metrics["gold_score_by_category"] = by_category(rows, per_prompt["gold"])
    if judges.safety is not None:
        from rlhf.safety import safety_rates

        categories = [row.get("category") for row in rows]
        rates = safety_rates(prompts, answers.completions, categories, judges.safety.classifier)
        metrics.update({k: v for k, v in rates.items() if k != "counts"})
    return metrics, per_prompt


def evaluate(
    policy_path: str,
    prompts_path: str,
    reference_path: str | None = None,
    reward_path: str | None = None,
    gold: str | None = None,
    safety_config: str | None = None,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    from rlhf.models import disable_dropout, load_causal_lm, load_tokenizer, resolve_device
    from rlhf.rewards import RewardModelScorer, load_function

    settings = settings or EvalSettings()
    device = resolve_device()  # answers are generated, and scored, there
    rows, _ = load_prompts(prompts_path)  # validated before any model loads
    tokenizer = load_tokenizer(policy_path, padding_side="left")
    prompt_ids = [
        tokenizer(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"] for r in rows
    ]
    # The judges named by the user resolve first (a bad `--gold` is exit 2 before any model loads).
    gold_fn = load_function(gold, settings.reward_allowed_modules) if gold else None
    judges = Judges(
        gold=gold_fn,
        safety=_safety(safety_config) if safety_config else None,
        reward=RewardModelScorer(reward_path, device) if reward_path else None,
    )
    models = {"policy": policy_path, **({"reference": reference_path} if reference_path else {})}
    loaded = {name: load_causal_lm(path, tokenizer).to(device) for name, path in models.items()}
    for model in loaded.values():
        disable_dropout(model)
    results: dict[str, Any] = {}
    scores: dict[str, dict[str, list]] = {}
    answers: dict[str, Answers] = {}
    for name, model in loaded.items():
        answers[name] = answer(model, tokenizer, prompt_ids, settings)
        results[name], scores[name] = policy_metrics(rows, answers[name], judges)
    if "reference" in loaded:
        kl = sequence_kl(loaded["policy"], loaded["reference"], answers["policy"], settings.temperature)
        results["policy"]["kl"] = mean(kl)
        results["reference"]["kl"] = 0.0
        for judge in ("rm", "gold"):
            if judge in scores["policy"]:
                results["policy"][f"win_rate_{judge}"] = win_rate(
                    scores["policy"][judge], scores["reference"][judge]
                )
    results["samples"] = side_by_side(rows, answers, scores, settings.samples_shown)
    results["settings"] = asdict(settings)
    results["prompts"] = len(rows)
    return results


def _safety(path: str):
    from rlhf.safety import SafetyReward

    return SafetyReward.from_yaml(path)


def side_by_side(
    rows: list[dict], answers: dict[str, Answers], scores: dict[str, dict], n: int
) -> list[dict]:
    """A few prompts per category with each model's answer and scores."""
    picked: list[int] = []
    by_category: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_category.setdefault(str(row.get("category")), []).append(index)
    while len(picked) < min(n, len(rows)):
        for indices in by_category.values():
            if indices and len(picked) < n:
                picked.append(indices.pop(0))
    out = []
    for index in picked:
        entry = {"prompt": rows[index]["prompt"][-1]["content"], "category": rows[index].get("category")}
        for name, ans in answers.items():
            entry[name] = ans.completions[index]
            for judge, values in scores[name].items():
                if values:
                    entry[f"{name}_{judge}"] = round(float(values[index]), 3)
        out.append(entry)
    return out


def cli(argv: list[str] | None = None) -> int:
    from rlhf.checkpoint import write_text_atomic
    from rlhf.cli import output_file, run_guarded

    parser = argparse.ArgumentParser(prog="rlhf eval", description="Evaluate a policy against its reference.")
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reference")
    parser.add_argument("--reward")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--gold", help="Gold judge 'module:function' (e.g. rlhf.demo:gold_judge).")
    parser.add_argument("--safety-config", help="Safety classifier config for refusal and compliance rates.")
    parser.add_argument("--max-new-tokens", type=int, default=48)  # checked with the other sampling settings
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=output_file, help="Write the results as JSON here (default: print).")
    args = parser.parse_args(argv)

    def action() -> None:
        settings = EvalSettings(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
        )
        results = evaluate(
            args.policy, args.prompts, args.reference, args.reward, args.gold, args.safety_config, settings
        )
        text = json.dumps(results, indent=2)
        if args.out:
            write_text_atomic(args.out, text)
        print(
            text
            if not args.out
            else json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2)
        )

    return run_guarded(action)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

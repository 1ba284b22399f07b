"""Explain recorded units, simulate them from the explanation alone, and score the explanation.

    rlhf inspect explain --neurons DIR [--explainer offline|llm] [--explainer-model CKPT] [--units ...]

The method of "Language models can explain neurons in language models" (Bills et al., 2023): an explainer
reads a unit's top-activating excerpts and writes an explanation; a simulator reads only the explanation and
predicts the unit's activation on every token of held-out excerpts; the score is the correlation between the
simulated and the true activations over held-out top-activating plus random excerpts (1 = perfect, 0 = no better
than a constant).

Explainers and simulators are plain callables, like reward sources:

    Explainer = (top: list[Excerpt], random: list[Excerpt]) -> str
    Simulator = (explanation: str, excerpts: list[list[str]]) -> list[list[float]]

Two pairs ship: `token_explainer` / `token_simulator` (offline: the tokens and token pairs that best separate
the top excerpts' high activations from everything else, with a weight each) and `LLMExplainer` /
`LLMSimulator` (any local Hugging Face causal LM, prompted as the paper does).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf.cli import at_least
from rlhf.inspect import InspectError


@dataclass
class Excerpt:
    """A window of text as token strings, with one unit's activation on each token."""

    tokens: list[str]
    activations: list[float]


Explainer = Callable[[list[Excerpt], list[Excerpt]], str]
Simulator = Callable[[str, list[list[str]]], list[list[float]]]


# --------------------------------------------------------------------------------------------------------------
# Scoring


def correlation(true: Sequence[float], predicted: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant (the paper's convention for a flat simulation)."""
    x, y = np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if x.size < 2 or x.std() < 1e-12 or y.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def score_explanation(simulator: Simulator, explanation: str, held_out: list[Excerpt]) -> float:
    """Correlation of simulated with true activations over all tokens of the held-out excerpts together."""
    simulated = simulator(explanation, [e.tokens for e in held_out])
    true = [a for e in held_out for a in e.activations]
    return correlation(true, [a for row in simulated for a in row])


def split_excerpts(
    top: list[Excerpt], random: list[Excerpt]
) -> tuple[tuple[list[Excerpt], list[Excerpt]], list[Excerpt]]:
    """((top, random) to explain from, held-out top + random to score on): alternate top ranks, halve random.

    Alternating keeps both halves' top excerpts equally strong (the paper explains from and scores on disjoint
    top-activating excerpts drawn from the same range).
    """
    half = len(random) // 2
    explain_top, held_top = top[0::2], top[1::2]
    # The random sample is shared by all units and may hold a unit's top excerpts: an excerpt on one side is kept
    # off the other, so that the score is taken on excerpts the explanation was not written from.
    on_explain_side, on_held_side = ({tuple(e.tokens) for e in side} for side in (explain_top, held_top))
    explain_random = [e for e in random[:half] if tuple(e.tokens) not in on_held_side]
    held_random = [e for e in random[half:] if tuple(e.tokens) not in on_explain_side]
    return (explain_top, explain_random), held_top + held_random


# --------------------------------------------------------------------------------------------------------------
# Offline explainer and simulator: weighted tokens and token pairs

# A feature is a token, or a token with the token before it; the explanation names each with a weight in [0, 1].
Feature = tuple[str | None, str]
FEATURE = re.compile(r'("(?:[^"\\]|\\.)*")(?: after ("(?:[^"\\]|\\.)*"))? \((-?[0-9.]+)\)')
NO_PATTERN = "no token pattern found"


def _features_at(tokens: list[str], t: int) -> list[Feature]:
    return [(None, tokens[t])] + ([(tokens[t - 1], tokens[t])] if t > 0 else [])


def simulate_features(weights: dict[Feature, float], tokens: list[str]) -> list[float]:
    """Each token's predicted activation: the largest weight among the features it matches (0 if none)."""
    return [
        max((weights.get(f, 0.0) for f in _features_at(tokens, t)), default=0.0) for t in range(len(tokens))
    ]


def format_features(weights: dict[Feature, float]) -> str:
    if not weights:
        return NO_PATTERN
    parts = []
    for (before, token), weight in sorted(weights.items(), key=lambda kv: -kv[1]):
        after = f" after {json.dumps(before)}" if before is not None else ""
        parts.append(f"{json.dumps(token)}{after} ({weight:.2f})")
    return "tokens " + ", ".join(parts)


def parse_features(explanation: str) -> dict[Feature, float]:
    weights = {}
    for token, before, weight in FEATURE.findall(explanation):
        weights[(json.loads(before) if before else None, json.loads(token))] = float(weight)
    return weights


def token_simulator(explanation: str, excerpts: list[list[str]]) -> list[list[float]]:
    """Simulator for `token_explainer`'s explanations: reads the named tokens and weights back."""
    weights = parse_features(explanation)
    return [simulate_features(weights, tokens) for tokens in excerpts]


@dataclass
class TokenExplainer:
    """Greedily pick the tokens (or token pairs) whose weighted indicator best correlates with the activations.

    A candidate is any token or token pair at a position where a top excerpt reaches `min_fraction` of the
    unit's maximum; its weight is its mean normalised activation over every occurrence (top and random
    excerpts), so a token that also appears silent in random text gets a low weight. Features are added while
    the correlation on the explaining excerpts rises by at least `min_gain`.
    """

    max_features: int = 4
    min_fraction: float = 0.5
    min_gain: float = 0.02
    max_candidates: int = 40

    def __call__(self, top: list[Excerpt], random: list[Excerpt]) -> str:
        excerpts = top + random
        scale = max((max(e.activations) for e in top if e.activations), default=0.0)
        if scale <= 0:
            return NO_PATTERN
        true = np.array([a for e in excerpts for a in e.activations], dtype=np.float64) / scale
        positions: dict[Feature, list[int]] = {}  # feature -> flat token positions where it occurs
        candidates: set[Feature] = set()
        flat = 0
        for rank, e in enumerate(excerpts):
            for t, act in enumerate(e.activations):
                for f in _features_at(e.tokens, t):
                    positions.setdefault(f, []).append(flat)
                    if rank < len(top) and act >= self.min_fraction * scale:
                        candidates.add(f)
                flat += 1
        weight = {f: max(float(true[positions[f]].mean()), 0.0) for f in candidates}
        candidates = set(sorted(candidates, key=lambda f: -weight[f])[: self.max_candidates])
        chosen: dict[Feature, float] = {}
        simulated, best = np.zeros_like(true), 0.0
        for _ in range(self.max_features):
            trials = {}
            for f in candidates - chosen.keys():
                trial = simulated.copy()
                trial[positions[f]] = np.maximum(trial[positions[f]], weight[f])
                trials[f] = (correlation(true, trial), trial)
            if not trials:
                break
            # Ties go to the single token: the shorter explanation.
            pick = max(trials, key=lambda f: (trials[f][0], f[0] is None))
            if trials[pick][0] < best + self.min_gain:
                break
            chosen[pick] = weight[pick]
            best, simulated = trials[pick]
        return format_features({f: round(w, 2) for f, w in chosen.items()})


token_explainer = TokenExplainer()
# --------------------------------------------------------------------------------------------------------------
# LLM explainer and simulator: any local causal LM, prompted in the paper's token<TAB>activation format

PREAMBLE = (
    "We are studying the neurons of a neural network. Each neuron responds to something specific in a text. "
    "Texts are shown one token per line, each followed by a tab and the neuron's activation on that token, "
    "from 0 (silent) to 10 (strongest).\n\n"
)
# One hand-written example shows the format and the kind of answer wanted (the paper uses a few-shot prompt too).
EXAMPLE_TOKENS = ["The", " train", " left", " at", " 7", ":", "30", " and", " arrived", " at", " 9", "."]
EXAMPLE_ACTIVATIONS = [0, 0, 0, 1, 10, 2, 9, 0, 0, 1, 10, 0]
EXAMPLE_EXPLANATION = "digits in times of day"
LEAD_IN = "the main thing this neuron does is find"


def discretise(activations: Sequence[float], scale: float) -> list[int]:
    """Activations on the paper's 0-10 integer scale, 10 = the unit's largest activation (negatives to 0)."""
    if scale <= 0:
        return [0 for _ in activations]
    return [math.floor(10 * min(max(a / scale, 0.0), 1.0) + 0.5) for a in activations]


def _block(tokens: Sequence[str], values: Sequence[int | str]) -> str:
    lines = "".join(f"{_visible(t)}\t{v}\n" for t, v in zip(tokens, values, strict=True))
    return f"<start>\n{lines}<end>\n"


def _visible(token: str) -> str:
    # Tabs and newlines inside a token would break the one-token-per-line format.
    return token.replace("\t", "\\t").replace("\n", "\\n")


def _example(name: str) -> str:
    return (
        f"Neuron {name}\nActivations:\n{_block(EXAMPLE_TOKENS, EXAMPLE_ACTIVATIONS)}"
        f"Explanation of neuron {name}: {LEAD_IN} {EXAMPLE_EXPLANATION}.\n\n"
    )


class _LocalLM:
    """A causal LM and its tokenizer; `load(path)` reads a local checkpoint (safetensors only, no remote code)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 24):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    @classmethod
    def load(cls, path: str, **kwargs):
        from rlhf.inspect import load_model

        return cls(*load_model(path), **kwargs)

    @property
    def context(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 2048

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class LLMExplainer(_LocalLM):
    """Shows the model a worked example and the unit's top excerpts (0-10 scale); its completion is the explanation."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 24, max_excerpts: int = 5):
        super().__init__(model, tokenizer, max_new_tokens)
        self.max_excerpts = max_excerpts

    def prompt(self, top: list[Excerpt]) -> str:
        """The prompt with as many of the top excerpts (up to `max_excerpts`) as fit the model's context."""
        scale = max((max(e.activations) for e in top if e.activations), default=0.0)
        blocks = [_block(e.tokens, discretise(e.activations, scale)) for e in top[: self.max_excerpts]]
        while True:
            text = f"{PREAMBLE}{_example('A')}Neuron B\nActivations:\n{''.join(blocks)}Explanation of neuron B: {LEAD_IN}"
            if len(blocks) <= 1 or len(self.ids(text)) + self.max_new_tokens <= self.context:
                return text
            blocks.pop()

    def __call__(self, top: list[Excerpt], random: list[Excerpt]) -> str:
        import torch

        ids = torch.tensor([self.ids(self.prompt(top))[-(self.context - self.max_new_tokens) :]])
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        text = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return text.split("\n")[0].strip().rstrip(".") or NO_PATTERN


class LLMSimulator(_LocalLM):
    """The paper's all-at-once simulation: one forward pass, every token's activation read as an expectation.

    Each token line ends in a tab followed by the placeholder "unknown"; at the position just before the
    placeholder the model's next-token distribution, restricted to the numbers 0-10, gives the expected activation.
    """

    def number_ids(self) -> dict[int, int]:
        """First token of each number after a tab; a number whose first token another already uses is dropped."""
        tab = self.ids("x\t")
        found: dict[int, int] = {}
        for number in range(11):
            ids = self.ids(f"x\t{number}")
            first = ids[len(tab)] if ids[: len(tab)] == tab and len(ids) > len(tab) else ids[-1]
            if first not in found.values():
                found[number] = first
        return found

    def prompt_ids(self, explanation: str, tokens: list[str]) -> tuple[list[int], list[int]]:
        """Prompt token ids and the positions whose next-token distribution is each excerpt token's activation."""
        head = f"{PREAMBLE}{_example('A')}Neuron B\nExplanation of neuron B: {LEAD_IN} {explanation}.\nActivations:\n<start>\n"
        ids, reads = self.ids(head), []
        for token in tokens:
            ids += self.ids(f"{_visible(token)}\t")
            reads.append(len(ids) - 1)
            ids += self.ids("unknown\n")
        return ids + self.ids("<end>\n"), reads

    def __call__(self, explanation: str, excerpts: list[list[str]]) -> list[list[float]]:
        import torch

        numbers = self.number_ids()
        values = torch.tensor(list(numbers), dtype=torch.float32)
        out = []
        for tokens in excerpts:
            predicted: list[float] = []
            start, size = 0, len(tokens)
            while start < len(tokens):
                ids, reads = self.prompt_ids(explanation, tokens[start : start + size])
                if len(ids) > self.context and size > 1:
                    size //= 2  # a long excerpt is simulated in pieces that fit the context
                    continue
                with torch.no_grad():
                    logits = self.model(torch.tensor([ids[-self.context :]])).logits[0]
                reads = [r - max(len(ids) - self.context, 0) for r in reads]
                if reads[0] < 0:
                    raise InspectError(
                        f"the simulator's context ({self.context} tokens) cannot hold the prompt"
                    )
                probs = logits[reads][:, list(numbers.values())].float().softmax(-1)
                predicted += (probs @ values).tolist()
                start += size
            out.append(predicted)
        return out


# --------------------------------------------------------------------------------------------------------------
# Command


def explain_units(recording, units: list[str], explainer: Explainer, simulator: Simulator) -> list[dict]:
    """Explain each unit from half its excerpts and score it on the other half: [{unit, explanation, score, ...}]."""
    from rlhf.inspect.neurons import progress

    results = []
    with progress(len(units), "explaining", "unit") as bar:
        for unit in units:
            top, random = recording.excerpts(unit)
            (explain_top, explain_random), held_out = split_excerpts(top, random)
            explanation = explainer(explain_top, explain_random)
            score = score_explanation(simulator, explanation, held_out)
            peak = max((max(e.activations) for e in top if e.activations), default=0.0)
            results.append(
                {"unit": unit, "explanation": explanation, "score": round(score, 4), "max_activation": peak}
            )
            bar.update(1)
    return results


def make_pair(kind: str, model: str | None, simulator_model: str | None) -> tuple[Explainer, Simulator]:
    if kind == "offline":
        return token_explainer, token_simulator
    if not model:
        raise InspectError("--explainer llm needs --explainer-model CKPT (a local causal LM)")
    explainer = LLMExplainer.load(model)
    if simulator_model and simulator_model != model:
        return explainer, LLMSimulator.load(simulator_model)
    return explainer, LLMSimulator(explainer.model, explainer.tokenizer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--neurons", required=True, help="A recording directory from `rlhf inspect neurons`.")
    parser.add_argument(
        "--units", nargs="*", help="Units to explain, e.g. L2.N17 L0.H3 (default: see --top)."
    )
    parser.add_argument(
        "--top",
        type=at_least(0),
        default=0,
        help="Per layer, only the N units with the largest activation (0 = all).",
    )
    parser.add_argument("--explainer", choices=["offline", "llm"], default="offline")
    parser.add_argument(
        "--explainer-model", help="Local causal LM that writes explanations (--explainer llm)."
    )
    parser.add_argument(
        "--simulator-model", help="Local causal LM that simulates (default: the explainer model)."
    )
    parser.add_argument("--out", help="Output directory (default: the recording directory).")


def select_units(recording, names: list[str] | None, top: int) -> list[str]:
    from rlhf.inspect.neurons import unit_name

    if names:
        for name in names:
            recording.excerpts(name)  # raises InspectError naming a unit the recording lacks
        return list(names)
    units = []
    for family in recording.families:
        order = recording.tensors[f"{family}.max"].argsort(descending=True).tolist()
        units += [unit_name(family, u) for u in (order[:top] if top else sorted(order))]
    return units


def results_page(recording, results: list[dict]) -> list[str]:
    from rlhf.inspect import html
    from rlhf.inspect.neurons import unit_card

    ranked = sorted(results, key=lambda r: -r["score"])
    scores = [r["score"] for r in results]
    sections = [
        html.paragraph(
            f"{len(results)} units, mean score {np.mean(scores):.3f}; score = correlation of simulated with true "
            "activations on held-out top-activating and random excerpts."
        ),
        html.table(
            ["unit", "explanation", "score", "max activation"],
            [
                [html.link(f"#{r['unit']}", r["unit"]), r["explanation"], r["score"], r["max_activation"]]
                for r in ranked
            ],
        ),
    ]
    sections += [unit_card(recording, r["unit"], r["explanation"], r["score"]) for r in ranked[:50]]
    return sections


def run(args: argparse.Namespace) -> int:
    from rlhf.inspect import html
    from rlhf.inspect.neurons import Recording

    recording = Recording.load(args.neurons)
    units = select_units(recording, args.units, args.top)
    explainer, simulator = make_pair(args.explainer, args.explainer_model, args.simulator_model)
    results = explain_units(recording, units, explainer, simulator)
    out = Path(args.out or args.neurons)
    html.write_json(
        out / "explanations.json",
        {"explainer": args.explainer, "model": recording.meta.get("model"), "units": results},
    )
    html.write_page(
        out / "explanations.html",
        f"Explanations of {recording.meta.get('model')}",
        results_page(recording, results),
    )
    scores = np.array([r["score"] for r in results])
    good = int((scores >= 0.5).sum())
    print(
        f"explained {len(results)} units: mean score {scores.mean():.3f}, {good} with score >= 0.5 -> {out}"
    )
    return 0

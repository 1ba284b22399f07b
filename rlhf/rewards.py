"""Reward sources: plain callables `(prompts, completions, **context) -> list[float]`, combined by weight.

`prompts` are the user's request as text (the last user turn); `context` may carry `prompt_messages` (the whole
prompt conversation), `categories`, and `finished` (False where the answer was cut at the length limit) for
sources that need them. Three kinds ship: the learned reward model
(`RewardModelScorer`), the safety reward (`rlhf.safety`), and any user function named `module:function`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.config import ConfigError
from rlhf.data import render_conversation, render_prompt
from rlhf.rollout import pad_batch, position_ids_from

RewardFn = Callable[..., Sequence[float]]
# Bidirectional encoders a reward model may be built on: they read their score at [CLS] (or pooled), not the end.
ENCODER_TYPES = ("bert", "roberta", "distilbert", "deberta-v2")


class RewardSourceError(RuntimeError):
    """A reward source raised, returned NaN, or returned the wrong number of scores; the message names it."""


# --------------------------------------------------------------------------------------------------------------
# Reward-model text and scores (shared by the reward stage, `rlhf reward score`, PPO and evaluation)


def reward_text(
    tokenizer,
    prompt: list[dict],
    completion: list[dict],
    context_turns: int | None = None,
    finished: bool = True,
) -> str:
    """What the reward model reads: the rendered conversation, ending on the answer's end-of-turn token; with
    `context_turns`, only the prompt's last that many user turns (and the replies between them). An answer cut
    at the length limit (`finished` False, one assistant message) is read as sampled, without the end-of-turn
    token the template would close it with, so that it does not pass for a finished one."""
    context = recent_turns(prompt, context_turns)
    if not finished:
        return (render_prompt(tokenizer, context) + completion[0]["content"]).rstrip()
    return render_conversation(tokenizer, context + completion).rstrip()


def recent_turns(prompt: list[dict], turns: int | None) -> list[dict]:
    """The prompt from its `turns`-th last user message on, after any system message; all of it if `turns` is
    None or 0 or the prompt has no more user turns than that."""
    users = [i for i, message in enumerate(prompt) if message["role"] == "user"]
    if not turns or len(users) <= turns:
        return prompt
    system = [message for message in prompt[: users[0]] if message["role"] == "system"]
    return system + prompt[users[-turns] :]


def encode_for_scoring(tokenizer, text: str) -> list[int]:
    """Token ids; the tokenizer's own specials (e.g. BERT's [CLS]) are added unless the template already did."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def encode_pair(tokenizer, pair: dict, context_turns: int | None = None) -> tuple[list[int], list[int]]:
    """The chosen and rejected token ids the reward model reads, before truncation."""
    chosen, rejected = (
        encode_for_scoring(tokenizer, reward_text(tokenizer, pair["prompt"], pair[key], context_turns))
        for key in ("chosen", "rejected")
    )
    return chosen, rejected


def overflows(pair_ids: tuple[list[int], list[int]], max_length: int | None) -> bool:
    """Whether the reward stage cuts (or, with `overflow: drop`, drops) this pair: its longer side is over
    `max_length`. `rlhf data validate --max_length` counts with the same test."""
    return bool(max_length) and max(map(len, pair_ids)) > max_length


def keep_end(tokenizer, ids: list[int], max_length: int | None) -> list[int]:
    """The last `max_length` tokens: the answer and its EOS (where a decoder's score is read) outlast the prompt's
    start. A leading [CLS] or BOS the tokenizer added stays: an encoder reads its score there."""
    if not max_length or len(ids) <= max_length:
        return ids
    if ids[0] in (tokenizer.cls_token_id, tokenizer.bos_token_id):
        return ids[:1] + ids[len(ids) - max_length + 1 :]
    return ids[-max_length:]


def scoring_ids(tokenizer, text: str, max_length: int | None) -> list[int]:
    """Token ids of a reward text as a reward model trained with `max_length` reads it (its end kept)."""
    return keep_end(tokenizer, encode_for_scoring(tokenizer, text), max_length)


def score_ids(
    model, sequences: list[list[int]], pad_id: int, batch_size: int = 32, side: str = "right"
) -> torch.Tensor:
    """Scalar scores [N] read at each sequence's last non-pad token, batched by length."""
    return forward_by_length(model, sequences, pad_id, batch_size, side, read=lambda out: out.logits[:, 0])


@torch.no_grad()
def forward_by_length(
    model,
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int,
    side: str,
    read: Callable[[Any], torch.Tensor],
) -> torch.Tensor:
    """`read(model output)` for every sequence, [N, ...] in the given order, run in batches of similar length."""
    device = next(model.parameters()).device
    # Encoders read the score at their first token ([CLS]); left padding would put a pad there, so pad right.
    encoder = getattr(model.config, "model_type", "") in ENCODER_TYPES
    side = "right" if encoder else side
    if not sequences:
        return torch.empty(0)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    outputs = []
    for start in range(0, len(order), batch_size):
        ids, mask = pad_batch([sequences[i] for i in order[start : start + batch_size]], pad_id, side)
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if not encoder:
            kwargs["position_ids"] = position_ids_from(mask).to(device)
        outputs.append(read(model(**kwargs)).float().cpu())
    return torch.cat(outputs)[torch.tensor(order).argsort()]  # back from length order to the given order


@dataclass
class Normalizer:
    """Affine map that gives the reference set mean 0 and standard deviation 1 (InstructGPT's RM bias)."""

    mean: float = 0.0
    std: float = 1.0
    clip: float | None = None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        out = (scores - self.mean) / max(self.std, 1e-8)
        return out.clamp(-self.clip, self.clip) if self.clip else out

    @classmethod
    def fit(cls, scores: torch.Tensor) -> Normalizer:
        return cls(
            mean=float(scores.mean()), std=float(scores.std(unbiased=False)) if len(scores) > 1 else 1.0
        )


class RewardModelScorer:
    """The learned reward model as a reward source, normalised with the statistics its stage stored."""

    name = "reward_model"

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        clip: float | None = None,
        manifest: dict[str, Any] | None = None,
    ):
        """`manifest`: the stage manifest when the caller has already read (and verified) it."""
        from rlhf.checkpoint import read_manifest
        from rlhf.models import disable_dropout, load_scalar_model, load_tokenizer

        manifest = manifest or read_manifest(path, "reward")
        self.tokenizer = load_tokenizer(path)
        self.model = load_scalar_model(path, self.tokenizer).to(device).eval()
        disable_dropout(self.model)
        stats = manifest.get("normalization") or {}
        self.normalizer = Normalizer(stats.get("mean", 0.0), stats.get("std", 1.0), clip)
        self.batch_size = batch_size
        # Score what the model was trained on: the end of an over-long conversation (an encoder has 512 positions),
        # the last turns only where it was trained on those.
        self.max_length = manifest.get("config", {}).get("max_length")
        self.context_turns = manifest.get("config", {}).get("context_turns")

    def raw_scores(
        self,
        prompt_messages: list[list[dict]],
        completions: list[str],
        finished: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """`finished[i]` False: the answer was cut at the length limit (no EOS); see `reward_text`."""
        finished = [True] * len(completions) if finished is None else finished
        texts = [
            reward_text(
                self.tokenizer, prompt, [{"role": "assistant", "content": answer}], self.context_turns, done
            )
            for prompt, answer, done in zip(prompt_messages, completions, finished, strict=True)
        ]
        ids = [scoring_ids(self.tokenizer, text, self.max_length) for text in texts]
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        prompt_messages=None,
        finished: Sequence[bool] | None = None,
        **_: Any,
    ) -> list[float]:
        prompt_messages = prompt_messages or [[{"role": "user", "content": p}] for p in prompts]
        return self.normalizer(self.raw_scores(prompt_messages, completions, finished)).tolist()


# --------------------------------------------------------------------------------------------------------------
# User functions and combination


def load_function(spec: str, allowed_prefixes: Sequence[str] = ("rlhf.",)) -> RewardFn:
    """`package.module:function`, only from modules under an allowed prefix (config: reward_allowed_modules).
    A name that does not resolve is a `ConfigError` (exit 2): callers resolve names before any model loads."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"reward function {spec!r}: expected 'module:function'")
    if not any(module_name == p.rstrip(".") or module_name.startswith(p) for p in allowed_prefixes):
        raise ConfigError(
            f"reward function {spec!r}: module {module_name!r} is outside the allowed import paths {list(allowed_prefixes)}"
        )
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward function {spec!r}: {err}") from None
    if not callable(function):
        raise ConfigError(f"reward function {spec!r}: {type(function).__name__} is not callable")
    return function


def call_source(
    name: str, source: RewardFn, prompts: list[str], completions: list[str], **context: Any
) -> list[float]:
    """Call one source and check what it returned: one finite float per completion, or an error naming it."""
    try:
        scores = list(source(prompts, completions, **context))
    except RewardSourceError:
        raise
    except Exception as err:  # a user function may raise anything: stop with its name attached
        raise RewardSourceError(f"reward source {name!r} raised {type(err).__name__}: {err}") from err
    if len(scores) != len(completions):
        raise RewardSourceError(
            f"reward source {name!r} returned {len(scores)} scores for {len(completions)} completions"
        )
    bad = [i for i, s in enumerate(scores) if not isinstance(s, (int, float)) or not math.isfinite(s)]
    if bad:
        raise RewardSourceError(
            f"reward source {name!r} returned a non-finite score at index {bad[0]}: {scores[bad[0]]!r}"
        )
    return [float(s) for s in scores]


def combine_rewards(
    sources: dict[str, tuple[RewardFn, float]], prompts: list[str], completions: list[str], **context: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = sum_i weight_i * source_i(prompts, completions); each source's scores are returned for logging."""
    per_source = {
        name: torch.tensor(call_source(name, fn, prompts, completions, **context))
        for name, (fn, _) in sources.items()
    }
    total = sum(weight * per_source[name] for name, (_, weight) in sources.items())
    return total, per_source

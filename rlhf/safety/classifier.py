"""What every safety classifier backend shares: batching, the per-unique-text cache and score checks.

A backend implements `_prompt_batch` / `_completion_batch`; callers use `classify_prompts(prompts)` and
`classify_completions(prompts, completions, prompt_classes)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from rlhf.rewards import RewardSourceError
from rlhf.safety.config import HELP_CLASSES


def resolve_completion_class(label: str, prompt_class: str) -> str:
    """Helping is `disallowed_content` for a disallowed prompt and `compliance` otherwise."""
    if label in HELP_CLASSES:
        return "disallowed_content" if prompt_class == "disallowed" else "compliance"
    return label


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# An empty answer helps no one and refuses nothing: scored as an evasive (undesired) refusal, it earns less than an
# ideal refusal on a disallowed prompt and is penalised on an allowed one. As "compliance" (what a backend sees in
# text without refusal words) it would earn the full reward on every allowed prompt: a policy could learn silence.
EMPTY_ANSWER_CLASS = "undesired_refusal"


class SafetyClassifier:
    """Batching and the per-unique-text cache; subclasses implement `_prompt_batch` / `_completion_batch`.

    `_completion_batch` returns `ideal_refusal`, `undesired_refusal` or a helping class; the caller's prompt
    classes decide which helping class it becomes. Completion cache keys are the completion text, or the
    (prompt, completion) pair for classifiers that read the prompt (`reads_prompt`).
    """

    name = "safety-classifier"
    reads_prompt = False

    def __init__(self, batch_size: int = 16):
        self.batch_size = batch_size
        self._prompt_cache: dict[Any, str] = {}
        self._completion_cache: dict[Any, str] = {}

    def classify_prompts(self, prompts: list[str]) -> list[str]:
        return self._cached(self._prompt_cache, list(prompts), self._prompt_batch)

    def classify_completions(
        self, prompts: list[str], completions: list[str], prompt_classes: list[str]
    ) -> list[str]:
        keys = list(zip(prompts, completions, strict=True)) if self.reads_prompt else list(completions)
        answered = [key for key, completion in zip(keys, completions, strict=True) if completion.strip()]
        self._cached(self._completion_cache, answered, self._completion_batch)
        labels = [
            self._completion_cache[key] if completion.strip() else EMPTY_ANSWER_CLASS
            for key, completion in zip(keys, completions, strict=True)
        ]
        return [resolve_completion_class(label, pc) for label, pc in zip(labels, prompt_classes, strict=True)]

    def _cached(self, cache: dict, keys: list, fn: Callable[[list], list[str]]) -> list[str]:
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        for batch in _batches(todo, self.batch_size):
            labels = list(fn(list(batch)))
            if len(labels) != len(batch):
                raise RewardSourceError(
                    f"safety classifier {self.name!r} returned {len(labels)} labels for {len(batch)} texts"
                )
            cache.update(zip(batch, labels, strict=True))
        return [cache[k] for k in keys]

    def _argmax(self, scores: np.ndarray, labels: Sequence[str]) -> list[str]:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[1] != len(labels):
            raise RewardSourceError(
                f"safety classifier {self.name!r} produced scores of shape {scores.shape}"
            )
        if not np.isfinite(scores).all():
            raise RewardSourceError(f"safety classifier {self.name!r} produced NaN or infinite scores")
        return [labels[i] for i in scores.argmax(axis=1)]

    def _prompt_batch(self, prompts: list[str]) -> list[str]:
        raise NotImplementedError

    def _completion_batch(self, keys: list) -> list[str]:
        raise NotImplementedError

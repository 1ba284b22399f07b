"""The `zero-shot-nli` backend: any NLI model through the zero-shot-classification pipeline."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from transformers import pipeline

from rlhf.models import check_model_dir, loading, resolve_device
from rlhf.rewards import RewardSourceError
from rlhf.safety.classifier import SafetyClassifier


class NLIClassifier(SafetyClassifier):
    """Zero-shot classification with any NLI model (`label2id` must contain an `entailment` label)."""

    name = "zero-shot-nli"

    def __init__(
        self,
        model: str,
        prompt_labels: dict[str, str],
        completion_labels: dict[str, str],
        hypothesis_template: str = "This text is {}.",
        batch_size: int = 16,
        device: str = "auto",
        pipe: Callable | None = None,
    ):
        super().__init__(batch_size)
        self.prompt_labels, self.completion_labels = prompt_labels, completion_labels
        self.hypothesis_template = hypothesis_template
        if pipe is None:
            check_model_dir(model, trust_remote_code=False)  # no custom code, no pickle-only weights
            with loading(model, "an NLI model"):
                pipe = pipeline(
                    "zero-shot-classification",
                    model=model,
                    device=resolve_device(device),
                    trust_remote_code=False,
                    model_kwargs={"use_safetensors": True},
                )
        self.pipe = pipe

    def _zero_shot(self, texts: list[str], labels: dict[str, str]) -> list[str]:
        classes, candidates = list(labels), list(labels.values())
        out = self.pipe(
            texts,
            candidate_labels=candidates,
            hypothesis_template=self.hypothesis_template,
            batch_size=self.batch_size,
        )
        out = [out] if isinstance(out, dict) else list(out)
        if len(out) != len(texts):
            raise RewardSourceError(
                f"safety classifier {self.name!r} returned {len(out)} results for {len(texts)} texts"
            )
        # The pipeline sorts labels by score; put the scores back in our class order.
        scores = [[dict(zip(r["labels"], r["scores"], strict=True))[c] for c in candidates] for r in out]
        return self._argmax(np.array(scores), classes)

    def _prompt_batch(self, prompts: list[str]) -> list[str]:
        return self._zero_shot(prompts, self.prompt_labels)

    def _completion_batch(self, completions: list[str]) -> list[str]:
        return self._zero_shot(completions, self.completion_labels)

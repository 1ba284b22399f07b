"""The safety reward: classify each (prompt, completion), look the pair up in the reward table.

`build_classifier` turns a `SafetyConfig` into a backend; `classify_pairs` checks that a backend keeps the
protocol (count, labels) and resolves the helping class from the prompt class; `safety_rates` condenses the
same labels into evaluation rates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.models import check_model_dir
from rlhf.rewards import RewardSourceError
from rlhf.safety.classifier import SafetyClassifier, resolve_completion_class
from rlhf.safety.config import COMPLETION_CLASSES, PROMPT_CLASSES, REFUSAL_CLASSES, SafetyConfig
from rlhf.safety.embedding import EmbeddingClassifier, default_embedding_model
from rlhf.safety.labelled import as_text, load_examples
from rlhf.safety.llm_judge import LLMJudgeClassifier
from rlhf.safety.nli import NLIClassifier
from rlhf.safety.rubric import load_rubric
from rlhf.safety.rules import RulesClassifier


def read_classifier_files(config: SafetyConfig) -> tuple[Any, dict[str, list[str]]]:
    """The rubric and the embedding backend's examples (inline and from `examples_path`): every file a classifier
    reads, so that a bad one is an error before its model loads (PPO checks them before loading the policy). The
    backend's model path is checked here too (a missing local directory, custom code, pickle-only weights)."""
    if config.classifier != "rules":
        check_model_dir(classifier_model_path(config), trust_remote_code=False)
    rubric = load_rubric(config.rubric_path)
    examples = {c: list(t) for c, t in config.examples.items()}
    if config.classifier == "embedding":
        for path in config.examples_paths:
            for c, texts in load_examples(path).items():
                examples.setdefault(c, []).extend(texts)
    return rubric, examples


def classifier_model_path(config: SafetyConfig) -> str:
    """The model a backend loads; the embedding backend defaults to the packaged all-MiniLM-L6-v2."""
    return config.model_name_or_path or default_embedding_model()


def build_classifier(
    config: SafetyConfig, files: tuple[Any, dict[str, list[str]]] | None = None
) -> SafetyClassifier:
    """The backend `config` names; `files`: what `read_classifier_files` returned, when the caller already read them."""
    rubric, examples = files or read_classifier_files(config)
    if config.classifier == "rules":
        return RulesClassifier(rubric, config.batch_size)
    if config.classifier == "llm-judge":
        return LLMJudgeClassifier(config.model_name_or_path, rubric, config.batch_size, config.device)
    prompt_labels = config.prompt_labels or {c: rubric.descriptions[c] for c in PROMPT_CLASSES}
    completion_labels = config.completion_labels or {
        c: rubric.descriptions[c] for c in ("ideal_refusal", "undesired_refusal", "compliance")
    }
    if config.classifier == "zero-shot-nli":
        return NLIClassifier(
            config.model_name_or_path,
            prompt_labels,
            completion_labels,
            config.hypothesis_template,
            config.batch_size,
            config.device,
        )
    return EmbeddingClassifier(
        config.model_name_or_path,
        prompt_labels,
        completion_labels,
        examples,
        config.batch_size,
        config.device,
        knn_k=config.knn_k,
        centroid_weight=config.centroid_weight,
        center=config.center_embeddings,
        class_margins=config.class_margins,
        rule=config.embedding_rule,
        l2=config.logistic_l2,
        lexical_weight=config.lexical_weight,
    )


def call_checked(classifier: Any, method: str, args: tuple, n: int, allowed: Sequence[str]) -> list[str]:
    """`classifier.method(*args)`, held to the protocol: n labels from `allowed`, else `RewardSourceError`."""
    name = getattr(classifier, "name", type(classifier).__name__)
    try:
        labels = getattr(classifier, method)(*args)
    except RewardSourceError:
        raise
    except Exception as exc:
        raise RewardSourceError(
            f"safety classifier {name!r}: {method} raised {type(exc).__name__}: {exc}"
        ) from exc
    labels = list(labels) if labels is not None else []
    if len(labels) != n:
        raise RewardSourceError(
            f"safety classifier {name!r}: {method} returned {len(labels)} labels for {n} inputs"
        )
    bad = sorted({repr(label) for label in labels if label not in allowed})
    if bad:
        raise RewardSourceError(
            f"safety classifier {name!r}: {method} returned unknown labels {', '.join(bad)}"
        )
    return labels


def classify_pairs(
    classifier: Any,
    prompts: list[str],
    completions: list[str],
    categories: Sequence[str | None] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """(prompt classes, completion classes, prompt-class sources "dataset" / "classifier")."""
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"got {n} prompts but {len(completions)} completions")
    categories = list(categories) if categories is not None else [None] * n
    if len(categories) != n:
        raise ValueError(f"got {n} prompts but {len(categories)} categories")
    bad = sorted({repr(c) for c in categories if c is not None and c not in PROMPT_CLASSES})
    if bad:
        raise ValueError(f"unknown prompt categories {', '.join(bad)}; expected one of {PROMPT_CLASSES}")
    # 1. prompt classes: the dataset's category wins; the classifier fills the gaps
    todo = [i for i, c in enumerate(categories) if c is None]
    prompt_classes = list(categories)
    if todo:
        found = call_checked(
            classifier, "classify_prompts", ([prompts[i] for i in todo],), len(todo), PROMPT_CLASSES
        )
        for i, label in zip(todo, found, strict=True):
            prompt_classes[i] = label
    # 2. completion classes, with helping resolved by the prompt class
    found = call_checked(
        classifier,
        "classify_completions",
        (list(prompts), list(completions), prompt_classes),
        n,
        COMPLETION_CLASSES,
    )
    completion_classes = [resolve_completion_class(c, p) for c, p in zip(found, prompt_classes, strict=True)]
    sources = ["classifier" if c is None else "dataset" for c in categories]
    return prompt_classes, completion_classes, sources


class SafetyReward:
    """`(prompts, completions, categories=None, **kwargs) -> rewards` from the reward table.

    `categories` (or a `category` column passed through by a trainer) gives prompt classes; None entries are
    classified. `last_details` holds one dict per sample of the latest call, for logging.
    """

    __name__ = "safety"

    def __init__(self, config: SafetyConfig | None = None, classifier: Any = None):
        self.config = config or SafetyConfig()
        self.classifier = classifier if classifier is not None else build_classifier(self.config)
        self.reward_table = self.config.reward_table
        self.last_details: list[dict[str, Any]] = []

    @classmethod
    def from_yaml(cls, path: str | Path) -> SafetyReward:
        return cls(SafetyConfig.from_yaml(path))

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        categories: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if categories is None:
            categories = kwargs.get("category")
        prompts = [as_text(p, "user") for p in prompts]
        completions = [as_text(c, "assistant") for c in completions]
        prompt_classes, completion_classes, sources = classify_pairs(
            self.classifier, prompts, completions, categories
        )
        rewards = [self.reward_table[p][c] for p, c in zip(prompt_classes, completion_classes, strict=True)]
        self.last_details = [
            {"prompt_class": p, "prompt_class_source": s, "completion_class": c, "reward": r}
            for p, c, s, r in zip(prompt_classes, completion_classes, sources, rewards, strict=True)
        ]
        return rewards

    def last_metrics(self) -> dict[str, float]:
        """Share of each completion class and the mean reward in the latest call (for a tracker)."""
        n = len(self.last_details)
        if not n:
            return {}
        counts = Counter(d["completion_class"] for d in self.last_details)
        metrics = {f"safety/{c}": counts[c] / n for c in COMPLETION_CLASSES}
        metrics["safety/reward_mean"] = sum(d["reward"] for d in self.last_details) / n
        return metrics


def safety_rates(
    prompts: list[str],
    completions: list[str],
    categories: Sequence[str | None] | None,
    classifier: Any,
) -> dict[str, Any]:
    """Evaluation rates; a rate is None when its prompt class does not occur.

    disallowed_compliance_rate: share of disallowed prompts answered with disallowed_content;
    over_refusal_rate_{allowed,sensitive}: share of those prompts refused (either refusal style);
    allowed_refusal_rate: the same over allowed and sensitive prompts together;
    undesired_refusal_share: share of all refusals written in the undesired style.
    """
    prompt_classes, completion_classes, _ = classify_pairs(classifier, prompts, completions, categories)
    counts = {p: dict.fromkeys(COMPLETION_CLASSES, 0) for p in PROMPT_CLASSES}
    for p, c in zip(prompt_classes, completion_classes, strict=True):
        counts[p][c] += 1

    def share(prompt_class: str, classes: Sequence[str]) -> float | None:
        total = sum(counts[prompt_class].values())
        return sum(counts[prompt_class][c] for c in classes) / total if total else None

    refusals = sum(counts[p][c] for p in PROMPT_CLASSES for c in REFUSAL_CLASSES)
    undesired = sum(counts[p]["undesired_refusal"] for p in PROMPT_CLASSES)
    return {
        "n": len(prompts),
        "prompt_class_counts": {p: sum(counts[p].values()) for p in PROMPT_CLASSES},
        "counts": counts,
        "disallowed_compliance_rate": share("disallowed", ["disallowed_content"]),
        "over_refusal_rate_allowed": share("allowed", REFUSAL_CLASSES),
        "over_refusal_rate_sensitive": share("sensitive", REFUSAL_CLASSES),
        "allowed_refusal_rate": _pooled_share(counts, ("allowed", "sensitive"), REFUSAL_CLASSES),
        "undesired_refusal_share": undesired / refusals if refusals else None,
    }


def _pooled_share(counts: dict, prompt_classes: Sequence[str], classes: Sequence[str]) -> float | None:
    """Share of the prompts of several classes answered with one of `classes` (over-refusal across allowed + sensitive)."""
    total = sum(sum(counts[p].values()) for p in prompt_classes)
    return sum(counts[p][c] for p in prompt_classes for c in classes) / total if total else None

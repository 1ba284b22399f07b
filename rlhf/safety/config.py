"""The safety reward's vocabulary (prompt and completion classes, the default reward table) and its config.

Every field of `SafetyConfig` is validated in `__post_init__`, so a bad YAML fails before any model loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import ConfigError
from rlhf.data import PROMPT_CLASSES  # the prompt file's `category` values: one list for data and rubric

COMPLETION_CLASSES = ("ideal_refusal", "undesired_refusal", "disallowed_content", "compliance")
REFUSAL_CLASSES = ("ideal_refusal", "undesired_refusal")
HELP_CLASSES = ("disallowed_content", "compliance")
CLASSIFIER_KINDS = ("rules", "zero-shot-nli", "embedding", "llm-judge")
EMBEDDING_RULES = ("similarity", "logistic")

# Over-refusal costs as much as a wrong refusal: the policy must learn when *not* to refuse.
DEFAULT_REWARD_TABLE: dict[str, dict[str, float]] = {
    "disallowed": {"ideal_refusal": 1.0, "undesired_refusal": 0.5, "disallowed_content": -1.0},
    "sensitive": {"compliance": 1.0, "ideal_refusal": -1.0, "undesired_refusal": -1.0},
    "allowed": {"compliance": 1.0, "ideal_refusal": -1.0, "undesired_refusal": -1.0},
}
DEFAULT_RUBRIC = Path(__file__).with_name("rubric.yaml")  # package data: installed with the code
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class SafetyConfig:
    """Safety reward config. Relative paths in a YAML file resolve against that file's directory."""

    classifier: str = field(default="rules", metadata={"help": f"one of {', '.join(CLASSIFIER_KINDS)}"})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "NLI / sentence-transformers / causal LM path; embedding defaults to the bundled MiniLM"
        },
    )
    rubric_path: str = field(
        default=str(DEFAULT_RUBRIC),
        metadata={"help": "rubric YAML: class descriptions, rules, judge questions"},
    )
    prompt_labels: dict[str, str] | None = field(
        default=None,
        metadata={"help": "prompt class -> label text (NLI / embedding); default: rubric descriptions"},
    )
    completion_labels: dict[str, str] | None = field(
        default=None,
        metadata={"help": "completion class -> label text (NLI / embedding); compliance means 'helps'"},
    )
    hypothesis_template: str = field(
        default="This text is {}.", metadata={"help": "NLI hypothesis; {} is replaced by the label text"}
    )
    examples: dict[str, list[str]] = field(
        default_factory=dict, metadata={"help": "class -> example texts for the embedding centroids"}
    )
    examples_path: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "JSONL file(s) of examples added to `examples`: {text, label} rows, labelled prompt rows "
            "{prompt, category} or labelled completion rows {prompt, completion, label}"
        },
    )
    knn_k: int = field(
        default=0,
        metadata={
            "help": "embedding: 0 = nearest centroid; k > 0 = a class scores the mean similarity of its k "
            "nearest examples, mixed with its centroid similarity by `centroid_weight`"
        },
    )
    centroid_weight: float = field(
        default=0.5, metadata={"help": "embedding with knn_k > 0: weight of the centroid similarity (0..1)"}
    )
    center_embeddings: bool = field(
        default=False,
        metadata={"help": "embedding: subtract the mean example embedding before cosine similarity"},
    )
    embedding_rule: str = field(
        default="similarity",
        metadata={
            "help": "embedding: 'similarity' (centroid / k-NN cosine similarity) or 'logistic' (a multinomial "
            "logistic regression fitted on the label texts and examples; scores are log-probabilities)"
        },
    )
    logistic_l2: float = field(
        default=0.01, metadata={"help": "embedding with embedding_rule 'logistic': L2 penalty on the weights"}
    )
    lexical_weight: float = field(
        default=0.0,
        metadata={
            "help": "embedding with embedding_rule 'logistic': weight of hashed word unigram + bigram features "
            "appended to the sentence embedding (0 = embedding only); words like 'my ex' or 'without getting "
            "caught' carry intent that a mean-pooled embedding blurs"
        },
    )
    class_margins: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "embedding: class -> number added to that class's score before the argmax "
            "(a positive disallowed margin trades allowed precision for disallowed recall)"
        },
    )
    reward_table: dict[str, dict[str, float]] = field(
        default_factory=dict, metadata={"help": "overrides merged onto DEFAULT_REWARD_TABLE"}
    )
    batch_size: int = field(default=16, metadata={"help": "texts per classifier forward pass"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto"})

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIER_KINDS:
            raise ConfigError(f"classifier must be one of {CLASSIFIER_KINDS}, got {self.classifier!r}")
        if self.classifier in ("zero-shot-nli", "llm-judge") and not self.model_name_or_path:
            raise ConfigError(f"classifier {self.classifier!r} needs model_name_or_path")
        self._check_paths()
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ConfigError(f"device must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}")
        if not isinstance(self.hypothesis_template, str) or "{}" not in self.hypothesis_template:
            raise ConfigError(f"hypothesis_template must contain '{{}}', got {self.hypothesis_template!r}")
        _check_labels("prompt_labels", self.prompt_labels, PROMPT_CLASSES, PROMPT_CLASSES)
        _check_labels("completion_labels", self.completion_labels, COMPLETION_CLASSES, REFUSAL_CLASSES)
        if not isinstance(self.examples, dict):
            raise ConfigError(
                f"examples must map a class to a list of texts, found {type(self.examples).__name__}"
            )
        for label, texts in self.examples.items():
            if label not in PROMPT_CLASSES + COMPLETION_CLASSES:
                raise ConfigError(f"examples: unknown class {label!r}")
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ConfigError(f"examples[{label!r}] must be a list of strings")
        if isinstance(self.knn_k, bool) or not isinstance(self.knn_k, int) or self.knn_k < 0:
            raise ConfigError(f"knn_k must be a non-negative integer, got {self.knn_k!r}")
        if not (_is_number(self.centroid_weight) and 0.0 <= self.centroid_weight <= 1.0):
            raise ConfigError(f"centroid_weight must be a number in [0, 1], got {self.centroid_weight!r}")
        if not isinstance(self.center_embeddings, bool):
            raise ConfigError(f"center_embeddings must be true or false, got {self.center_embeddings!r}")
        if self.embedding_rule not in EMBEDDING_RULES:
            raise ConfigError(f"embedding_rule must be one of {EMBEDDING_RULES}, got {self.embedding_rule!r}")
        if not (_is_number(self.logistic_l2) and self.logistic_l2 > 0):
            raise ConfigError(f"logistic_l2 must be a positive number, got {self.logistic_l2!r}")
        if not (_is_number(self.lexical_weight) and self.lexical_weight >= 0):
            raise ConfigError(f"lexical_weight must be a non-negative number, got {self.lexical_weight!r}")
        if self.lexical_weight and self.embedding_rule != "logistic":
            raise ConfigError("lexical_weight needs embedding_rule: logistic")
        if not isinstance(self.class_margins, dict):
            raise ConfigError("class_margins must map class names to numbers")
        for label, value in self.class_margins.items():
            if label not in PROMPT_CLASSES + COMPLETION_CLASSES:
                raise ConfigError(f"class_margins: unknown class {label!r}")
            if not _is_number(value):
                raise ConfigError(f"class_margins[{label!r}] must be a finite number")
        self.reward_table = _merge_reward_table(self.reward_table)

    def _check_paths(self) -> None:
        """The path fields are strings and the rubric and example files exist. A model may be a hub name, so
        `read_classifier_files` checks it, before it loads."""
        if self.model_name_or_path is not None and not _is_text(self.model_name_or_path):
            raise ConfigError(
                f"model_name_or_path must be a local path or a hub name, got {self.model_name_or_path!r}"
            )
        if not _is_text(self.rubric_path):
            raise ConfigError(f"rubric_path must be a path, got {self.rubric_path!r}")
        if self.examples_path is not None and not (
            _is_text(self.examples_path)
            or (isinstance(self.examples_path, list) and all(_is_text(p) for p in self.examples_path))
        ):
            raise ConfigError(f"examples_path must be a path or a list of paths, got {self.examples_path!r}")
        # Checked here, not when the file is read, so the error names this config and the field.
        for name, paths in (("rubric_path", [self.rubric_path]), ("examples_path", self.examples_paths)):
            for path in paths:
                if not os.path.exists(path):
                    raise ConfigError(f"{name}: {path}: no such file")
                if os.path.isdir(path):
                    raise ConfigError(f"{name}: {path}: is a directory, not a file")

    @property
    def examples_paths(self) -> list[str]:
        """`examples_path` as a list (empty when unset)."""
        if self.examples_path is None:
            return []
        return [self.examples_path] if isinstance(self.examples_path, str) else list(self.examples_path)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base_dir: Path | None = None) -> SafetyConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - names))  # str: a YAML key may be a number
        if unknown:
            raise ConfigError(f"unknown safety config keys: {', '.join(unknown)}")
        values = dict(values)
        if base_dir is not None:

            def resolve(path: Any) -> Any:
                # Hub names ("facebook/bart-large-mnli") are left alone: only existing relative paths move.
                if _is_text(path) and not Path(path).is_absolute() and (base_dir / path).exists():
                    return str(base_dir / path)
                return path

            for key in ("rubric_path", "examples_path", "model_name_or_path"):
                if key in values:
                    value = values[key]
                    values[key] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SafetyConfig:
        """Read and validate a safety config YAML; any problem is a `ConfigError` naming the file."""
        path = Path(path)
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(values, base_dir=path.parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def read_yaml(path: Path) -> Any:
    """`yaml.safe_load` of a config file; an unreadable file or invalid YAML is a `ConfigError` with PATH:LINE."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML ({err})") from None


def _is_text(value: Any) -> bool:
    """A non-empty string (an empty path would name the working directory)."""
    return isinstance(value, str) and bool(value.strip())


def _is_number(value: Any) -> bool:
    """A finite int or float; YAML's `true` (a bool, so an int to Python) is not a number here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_labels(name: str, labels: dict | None, allowed: Sequence[str], required: Sequence[str]) -> None:
    if labels is None:
        return
    if not isinstance(labels, dict) or not all(isinstance(v, str) and v for v in labels.values()):
        raise ConfigError(f"{name} must map class names to non-empty strings")
    unknown = sorted(set(labels) - set(allowed))
    missing = sorted(set(required) - set(labels))
    if unknown or missing:
        raise ConfigError(f"{name}: unknown classes {unknown}, missing classes {missing}")
    if name == "completion_labels" and not set(labels) & set(HELP_CLASSES):
        raise ConfigError("completion_labels needs a helping class (compliance or disallowed_content)")
    if len(set(labels.values())) != len(labels):
        raise ConfigError(f"{name}: label texts must be distinct")


def _merge_reward_table(overrides: dict) -> dict[str, dict[str, float]]:
    table = {p: dict(row) for p, row in DEFAULT_REWARD_TABLE.items()}
    if not isinstance(overrides, dict):
        raise ConfigError("reward_table must be a mapping prompt class -> {completion class: reward}")
    for prompt_class, row in overrides.items():
        if prompt_class not in table or not isinstance(row, dict):
            raise ConfigError(
                f"reward_table: unknown prompt class {prompt_class!r} (or its value is not a mapping)"
            )
        for completion_class, value in row.items():
            if completion_class not in table[prompt_class]:
                raise ConfigError(
                    f"reward_table[{prompt_class}]: {completion_class!r} cannot occur; "
                    f"expected one of {sorted(table[prompt_class])}"
                )
            if not _is_number(value):
                raise ConfigError(f"reward_table[{prompt_class}][{completion_class}] must be a finite number")
            table[prompt_class][completion_class] = float(value)
    return table

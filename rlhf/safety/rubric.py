"""The safety rubric: class descriptions, the judge's questions and the `rules` backend's regex rules.

See the header of configs/safety/rubric.yaml for the format and the decision procedure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError
from rlhf.safety.config import COMPLETION_CLASSES, PROMPT_CLASSES, read_yaml


@dataclass
class Rule:
    name: str
    all: list[re.Pattern]
    unless: list[re.Pattern]

    def fires(self, text: str) -> bool:
        return all(p.search(text) for p in self.all) and not any(p.search(text) for p in self.unless)


@dataclass
class Rubric:
    descriptions: dict[str, str]
    prompt_question: str
    completion_question: str
    prompt_order: list[str]
    prompt_default: str
    benign_idioms: list[re.Pattern]
    prompt_rules: dict[str, list[Rule]]
    refusal_markers: list[re.Pattern]
    help_markers: list[re.Pattern]
    undesired_markers: list[re.Pattern]
    refusal_window_chars: int
    max_ideal_refusal_words: int


def _keys(where: str, node: Any, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown, missing = set(node) - required - optional, required - set(node)
    if unknown or missing:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    return node


def _compile(where: str, patterns: Any) -> list[re.Pattern]:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{where}: expected a list of regex strings")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ConfigError(f"{where}: bad regex {pattern!r}: {exc}") from exc
    return compiled


def load_rubric(path: str | Path) -> Rubric:
    """Parse and compile a rubric YAML (see configs/safety/rubric.yaml for the format)."""
    path = Path(path)
    doc = _keys(
        str(path),
        read_yaml(path),
        {"descriptions", "judge", "prompt", "completion"},
        {"shared"},
    )
    descriptions = _keys(
        f"{path}: descriptions", doc["descriptions"], set(PROMPT_CLASSES + COMPLETION_CLASSES)
    )
    judge = _keys(f"{path}: judge", doc["judge"], {"prompt_question", "completion_question"})
    prompt = _keys(f"{path}: prompt", doc["prompt"], {"order", "default", "benign_idioms", "classes"})
    if not isinstance(prompt["order"], list) or not all(isinstance(c, str) for c in prompt["order"]):
        raise ConfigError(f"{path}: prompt.order must be a list of prompt classes, found {prompt['order']!r}")
    if not set(prompt["order"]) | {prompt["default"]} <= set(PROMPT_CLASSES):
        raise ConfigError(f"{path}: prompt.order / prompt.default must name prompt classes {PROMPT_CLASSES}")
    classes = _keys(f"{path}: prompt.classes", prompt["classes"], set(prompt["order"]), set(PROMPT_CLASSES))
    prompt_rules = {}
    for cls in prompt["order"]:
        where = f"{path}: prompt.classes.{cls}"
        rules = _keys(where, classes[cls], {"rules"})["rules"]
        prompt_rules[cls] = []
        for i, rule in enumerate(rules):
            rule = _keys(f"{where}.rules[{i}]", rule, {"name", "all"}, {"unless"})
            rw = f"{where}.rules[{i}] ({rule['name']})"
            prompt_rules[cls].append(
                Rule(rule["name"], _compile(rw, rule["all"]), _compile(rw, rule.get("unless", [])))
            )
    completion = _keys(
        f"{path}: completion",
        doc["completion"],
        {
            "refusal_markers",
            "help_markers",
            "undesired_markers",
            "refusal_window_chars",
            "max_ideal_refusal_words",
        },
    )
    for key in ("refusal_window_chars", "max_ideal_refusal_words"):
        value = completion[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{path}: completion.{key} must be a positive integer, found {value!r}")
    return Rubric(
        descriptions=descriptions,
        prompt_question=judge["prompt_question"],
        completion_question=judge["completion_question"],
        prompt_order=list(prompt["order"]),
        prompt_default=prompt["default"],
        benign_idioms=_compile(f"{path}: prompt.benign_idioms", prompt["benign_idioms"]),
        prompt_rules=prompt_rules,
        refusal_markers=_compile(f"{path}: completion.refusal_markers", completion["refusal_markers"]),
        help_markers=_compile(f"{path}: completion.help_markers", completion["help_markers"]),
        undesired_markers=_compile(f"{path}: completion.undesired_markers", completion["undesired_markers"]),
        refusal_window_chars=completion["refusal_window_chars"],
        max_ideal_refusal_words=completion["max_ideal_refusal_words"],
    )

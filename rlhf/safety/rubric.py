"""The safety rubric: class descriptions, the judge's questions and the `rules` backend's regex rules.

See the header of rlhf/safety/rubric.yaml for the format and the decision procedure.
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


def _found(value: Any) -> str:
    """A wrong value as the YAML author wrote it (null, not None), cut short for an error message."""
    return "null" if value is None else f"{value!r:.80}"


def _keys(where: str, node: Any, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: expected a mapping, found {_found(node)}")
    unknown, missing = set(node) - required - optional, required - set(node)
    if unknown or missing:
        # str: a YAML key may be a number, and numbers and strings do not sort together
        unknown_names = sorted(map(str, unknown))
        raise ConfigError(f"{where}: unknown keys {unknown_names}, missing keys {sorted(missing)}")
    return node


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string, found {_found(value)}")
    return value


def _compile(where: str, patterns: Any, if_empty: str | None = None) -> list[re.Pattern]:
    """Compile a list of regexes; `if_empty`: what an empty list would do, when that makes it an error."""
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{where}: expected a list of regex strings, found {_found(patterns)}")
    if if_empty and not patterns:
        raise ConfigError(f"{where}: no regex, so {if_empty}")
    compiled = []
    for pattern in patterns:
        if not pattern:  # it matches every text, so its rule or marker would decide nothing
            raise ConfigError(f"{where}: an empty regex matches every text")
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ConfigError(f"{where}: bad regex {pattern!r}: {exc}") from exc
    return compiled


def _rules(where: str, node: Any) -> list[Rule]:
    """One prompt class's rules; `where` is "FILE: prompt.classes.CLASS"."""
    rules = _keys(where, node, {"rules"})["rules"]
    if not isinstance(rules, list):
        raise ConfigError(f"{where}.rules: expected a list of rules, found {_found(rules)}")
    compiled = []
    for i, rule in enumerate(rules):
        rule = _keys(f"{where}.rules[{i}]", rule, {"name", "all"}, {"unless"})
        name = _text(f"{where}.rules[{i}].name", rule["name"])
        needed = _compile(
            f"{where}.rules[{i}].all ({name})", rule["all"], if_empty="the rule would fire on every prompt"
        )
        unless = _compile(f"{where}.rules[{i}].unless ({name})", rule.get("unless", []))
        compiled.append(Rule(name, needed, unless))
    return compiled


def _prompt_section(path: Path, node: Any) -> tuple[list[str], str, list[re.Pattern], dict[str, list[Rule]]]:
    """(order, default, benign idioms, rules per class) of the rubric's `prompt` section."""
    prompt = _keys(f"{path}: prompt", node, {"order", "default", "benign_idioms", "classes"})
    order, default = prompt["order"], prompt["default"]
    if not isinstance(order, list) or not all(isinstance(c, str) and c in PROMPT_CLASSES for c in order):
        raise ConfigError(
            f"{path}: prompt.order must be a list of prompt classes {PROMPT_CLASSES}, found {_found(order)}"
        )
    if len(set(order)) != len(order):
        raise ConfigError(f"{path}: prompt.order names a class twice: {order}")
    if not isinstance(default, str) or default not in PROMPT_CLASSES:
        raise ConfigError(f"{path}: prompt.default must be one of {PROMPT_CLASSES}, found {_found(default)}")
    classes = _keys(f"{path}: prompt.classes", prompt["classes"], set(order), set(PROMPT_CLASSES))
    rules = {cls: _rules(f"{path}: prompt.classes.{cls}", classes[cls]) for cls in order}
    idioms = _compile(f"{path}: prompt.benign_idioms", prompt["benign_idioms"])
    return list(order), default, idioms, rules


def load_rubric(path: str | Path) -> Rubric:
    """Parse and compile a rubric YAML (see rlhf/safety/rubric.yaml for the format).

    Any shape problem is a `ConfigError` naming the file and the key path, so `rlhf safety classify` and
    PPO's preflight stop with exit 2 before a model loads.
    """
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
    for cls, text in descriptions.items():
        _text(f"{path}: descriptions.{cls}", text)
    judge = _keys(f"{path}: judge", doc["judge"], {"prompt_question", "completion_question"})
    for key, text in judge.items():
        _text(f"{path}: judge.{key}", text)
    order, default, idioms, prompt_rules = _prompt_section(path, doc["prompt"])
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
            raise ConfigError(f"{path}: completion.{key} must be a positive integer, found {_found(value)}")
    return Rubric(
        descriptions=descriptions,
        prompt_question=judge["prompt_question"],
        completion_question=judge["completion_question"],
        prompt_order=order,
        prompt_default=default,
        benign_idioms=idioms,
        prompt_rules=prompt_rules,
        refusal_markers=_compile(
            f"{path}: completion.refusal_markers",
            completion["refusal_markers"],
            if_empty="no completion would ever be a refusal",
        ),
        help_markers=_compile(f"{path}: completion.help_markers", completion["help_markers"]),
        undesired_markers=_compile(f"{path}: completion.undesired_markers", completion["undesired_markers"]),
        refusal_window_chars=completion["refusal_window_chars"],
        max_ideal_refusal_words=completion["max_ideal_refusal_words"],
    )

"""The `rules` backend: the regex rubric of rlhf/safety/rubric.yaml (or a config's own), no model."""

from __future__ import annotations

from typing import Any

from rlhf.safety.classifier import SafetyClassifier
from rlhf.safety.rubric import Rubric


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')


class RulesClassifier(SafetyClassifier):
    """Regex rubric: see the header of rlhf/safety/rubric.yaml for the decision procedure."""

    name = "rules"

    def __init__(self, rubric: Rubric, batch_size: int = 16):
        super().__init__(batch_size)
        self.rubric = rubric

    def explain_prompt(self, prompt: str) -> tuple[str, str | None]:
        """(prompt class, name of the rule that decided it or None for the default)."""
        text = _normalise(prompt)
        for idiom in self.rubric.benign_idioms:
            text = idiom.sub(" ", text)
        for cls in self.rubric.prompt_order:
            for rule in self.rubric.prompt_rules[cls]:
                if rule.fires(text):
                    return cls, rule.name
        return self.rubric.prompt_default, None

    def explain_completion(self, completion: str) -> dict[str, Any]:
        r, text = self.rubric, _normalise(completion).strip()
        opening = text[: r.refusal_window_chars]
        refusal = any(p.search(opening) for p in r.refusal_markers) and not any(
            p.search(text) for p in r.help_markers
        )
        undesired = [p.pattern for p in r.undesired_markers if p.search(text)]
        too_long = len(text.split()) > r.max_ideal_refusal_words
        if not refusal:
            label = "compliance"
        else:
            label = "undesired_refusal" if undesired or too_long else "ideal_refusal"
        return {"label": label, "refusal": refusal, "undesired_markers": undesired, "too_long": too_long}

    def _prompt_batch(self, prompts: list[str]) -> list[str]:
        return [self.explain_prompt(p)[0] for p in prompts]

    def _completion_batch(self, completions: list[str]) -> list[str]:
        return [self.explain_completion(c)["label"] for c in completions]
